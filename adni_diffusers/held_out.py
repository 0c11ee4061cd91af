"""`adni-diffusers held-out`: the slices a trained model never saw, one path a line.

A model's held-out patients are drawn at training time from the seed and fraction in its records, and only
their counts and a hash are kept (a model's files travel to the Hub; ADNI file names carry subject ids). This
redraws them as `evaluate` and `counterfactual` do, from the records of a train_unet.py or train_vqmodel.py
output folder and the data folder, so that a counterfactual or an outside tool gets slices the model did not
train on. A slice of a patient either stage trained on (under --split given, one with slices in train/ too; a
VQModel's training patient where it held out others than the UNet) is left out, with a warning:

    adni-diffusers held-out --model adni_demo/ldm --class NC | head -3
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def held_out_slices(model_dir, data_dir=None, class_name: str | None = None, training: bool = False) -> list[str]:
    """The paths of the slices `model_dir`'s training held out (with `training`, the ones it trained on), of
    one class if `class_name` is given, in the data's order."""
    from .data import class_by_name_or_index
    from .evaluate import EvaluationError, load_evaluation_data, records_above
    from .files import read_json_object

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EvaluationError(f"--model {model_dir}: no such folder (a train_unet.py or train_vqmodel.py output)")
    # a listing of "held-out" slices is a claim: made only where the records confirm the redrawn split. Checked
    # before the data folder is decoded: --data-dir cannot make up for records that are not there
    recorded = read_json_object(model_dir / "training_data.json")
    if not any(isinstance(recorded.get(name), dict) and recorded[name] for name in ("train", "validation")):
        above = records_above(model_dir)
        raise EvaluationError(f"--model {model_dir}: its records (training_data.json) hold no summary of the split, "
                              "so the slices it never saw cannot be confirmed; "
                              + (f"{above} holds the training records: give --model {above}" if above else
                                 "give the training output folder (a train_unet.py or train_vqmodel.py "
                                 "--output_dir)"))
    data, record = load_evaluation_data(model_dir, data_dir)
    if record["matches_training"] is not True:  # (None: no summary, refused above)
        raise EvaluationError(f"the split of {data.root} differs from the one {model_dir}'s training recorded (the "
                              "warning above): the data changed since, so which slices the model never saw cannot "
                              "be told; give --data-dir the folder as it was at training")
    part = data.train if training else data.val
    chosen = range(len(part.paths))
    if class_name is not None:
        names = list(data.class_names or [])
        try:  # a name or an index, as generate --class and counterfactual --to take it
            class_name = class_by_name_or_index(names, class_name, "--class")
        except ValueError:
            raise EvaluationError(f"--class {class_name}: the data's classes are "
                                  f"{', '.join(names) if names else '(none)'}") from None
        index = names.index(class_name)
        chosen = [i for i, label in enumerate(part.labels.tolist()) if label == index]
    if not training:
        # "held-out" is a claim about the whole pipeline: a slice one stage trained on is left out, not listed
        chosen = _unseen_by_both_stages(model_dir, data, record, data_dir, list(chosen))
    paths = [part.paths[i] for i in chosen]
    logger.info("%d %s slice(s)%s of %d patient(s): --split %s%s, from %s's records%s", len(paths),
                "training" if training else "held-out", f" of class {class_name}" if class_name else "",
                len({part.patients[i] for i in chosen}), record["split"],
                f", --val_fraction {record['val_fraction']:g}, seed {record['seed']}"
                if record["split"] == "patient" else "", model_dir,
                "; whether its VQModel trained on them cannot be confirmed (the warning above)"
                if not training and record.get("first_stage_unconfirmed") else "")
    return paths


def _unseen_by_both_stages(model_dir: Path, data, record: dict, data_dir, chosen: list[int]) -> list[int]:
    """`chosen` (indices into data.val) less the slices of patients either stage trained on: under --split given a
    patient with slices in train/ too, and, where the VQModel held out other patients than the UNet, the VQModel's
    training patients. Each left out with a warning (a reviewer's report: they were listed, exit 0, the warning
    alone said so, and a pipe passes stdout on)."""
    from .data import PATIENT_SLICE_RE, patient_part, patients_by_rule, shared_patients

    val = data.val
    if data.shared_patients:
        # as data.py counts them: only names that give a patient (0.png in train/ and test/ is no one)
        def identified(path, patient):
            return PATIENT_SLICE_RE.match(Path(path).stem) is not None or patient != Path(path).stem

        both = set(shared_patients([p for f, p in zip(data.train.paths, data.train.patients) if identified(f, p)],
                                   [p for f, p in zip(val.paths, val.patients) if identified(f, p)]))
        out = [i for i in chosen if val.patients[i] in both and identified(val.paths[i], val.patients[i])]
        if out:
            logger.warning("--split given: left out %d held-out slice(s) of %d patient(s) who have slices in train/ "
                           "too, which the model trained on", len(out), len({val.patients[i] for i in out}))
            left_out = set(out)
            chosen = [i for i in chosen if i not in left_out]
    if record.get("first_stage_held_out") is False:
        vq_trained = _first_stage_training_paths(model_dir, data, record, data_dir)
        # both sides' patients by the UNet's --patient_ids rule, in one call (one name per subject across both): the
        # VQModel's own rule ("file" before 2026-12-03) gave ADNI_101_S_1006_m06 and ADNI_101_S_1006_bl apart
        named, _ = patients_by_rule([patient_part(p) for p in [*vq_trained, *val.paths]], data.patient_ids)
        seen, val_patients = set(named[:len(vq_trained)]), named[len(vq_trained):]
        out = [i for i in chosen if val_patients[i] in seen]
        if out:
            logger.warning("left out %d held-out slice(s) of %d patient(s) that the VQModel (first stage) trained on "
                           "(it held out other patients than the UNet)", len(out), len({val.patients[i] for i in out}))
        else:
            logger.info("the VQModel (first stage) held out other patients than the UNet, but trained on none of "
                        "these: none left out")
        left_out = set(out)
        chosen = [i for i in chosen if i not in left_out]
    return chosen


def _first_stage_training_paths(model_dir: Path, data, record: dict, data_dir) -> list[str]:
    """The slices the pipeline's VQModel trained on, redrawn from the UNet's record of it (vqmodel_data) as
    load_evaluation_data redraws the UNet's own split. EvaluationError where that record cannot be reproduced."""
    import torch

    from .data import DataError, load_slices
    from .evaluate import EvaluationError
    from .train_unet import vq_training_data

    vq = vq_training_data(model_dir / "vqvae") or {}  # (maps "subject" of a pipeline from before 2026-12-04)
    root = vq.get("root")
    if root and data_dir is not None and record["root"] and Path(root).resolve() == Path(record["root"]).resolve():
        root = data.root  # the UNet's folder, moved (--data-dir): the VQModel's too
    cannot = ("so which held-out slices neither stage trained on cannot be told (the VQModel held out other "
              "patients than the UNet)")
    if not root or not Path(root).is_dir():
        raise EvaluationError(f"the VQModel's training data {root or '(no folder recorded)'} (vqmodel_data in "
                              f"{model_dir / 'training_data.json'}) is not there, {cannot}; put it back there")
    try:
        vq_data = load_slices(root, split=vq.get("split") or "patient",
                              val_fraction=float(vq.get("val_fraction") or 0.1), seed=int(vq.get("split_seed") or 0),
                              preprocess=vq.get("preprocess") or data.preprocess,
                              flag="the VQModel's data folder",
                              patient_ids=vq.get("patient_ids") or "file")  # (none recorded: before 2026-12-03)
    except DataError as e:  # (names the folder)
        raise EvaluationError(f"{e}; {cannot}") from None
    if (vq_data.val.summary()["patients_sha256"] != vq["validation_patients_sha256"]
            or vq.get("validation_pixels_sha256") not in (None, vq_data.val.pixels_sha256())):
        raise EvaluationError(f"the VQModel's training data {root} no longer splits as its training recorded "
                              f"(vqmodel_data in {model_dir / 'training_data.json'}): it changed since, {cannot}")
    if Path(root).resolve() != Path(data.root).resolve():
        # names alone tell patients apart across two folders only where the same names hold the same images: a
        # re-export that numbered the patients otherwise puts other people under them
        by_name: dict[tuple, list] = {}  # (class folder, file name): a name may be in train/ and test/ both
        for part in (vq_data.train, vq_data.val):
            for k, path in enumerate(part.paths):
                by_name.setdefault((Path(path).parent.name, Path(path).name), []).append((part, k))
        renamed = [i for i, path in enumerate(data.val.paths)
                   if (found := by_name.get((Path(path).parent.name, Path(path).name)))
                   and not any(torch.equal(data.val.pixels[i], part.pixels[k]) for part, k in found)]
        if renamed:
            raise EvaluationError(f"the VQModel's training data {root} holds other images than {data.root} under "
                                  f"{len(renamed)} of the same file names (e.g. "
                                  f"{Path(data.val.paths[renamed[0]]).name}: a re-export, patients numbered "
                                  f"otherwise?), {cannot}")
    return list(vq_data.train.paths)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a train_unet.py or train_vqmodel.py output folder")
    parser.add_argument("--data-dir", default=None, help="the model's training data folder, if it moved since training")
    parser.add_argument("--class", dest="class_name", default=None,
                        help="only this class's slices (a name, e.g. NC, or its index)")
    parser.add_argument("--training", action="store_true",
                        help="list the slices the model trained on instead of the held-out ones")


def main(args: argparse.Namespace) -> int:
    paths = held_out_slices(args.model, args.data_dir, args.class_name, args.training)
    if paths:
        print("\n".join(paths))
    return 0
