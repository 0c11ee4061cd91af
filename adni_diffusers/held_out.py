"""`adni-diffusers held-out`: the slices a trained model never saw, one path a line.

A model's held-out patients are drawn at training time from the seed and fraction in its records, and only
their counts and a hash are kept (a model's files travel to the Hub; ADNI file names carry subject ids). This
redraws them as `evaluate` and `counterfactual` do, from the records of a train_unet.py or train_vqmodel.py
output folder and the data folder, so that a counterfactual or an outside tool gets slices the model did not
train on:

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
    paths = [part.paths[i] for i in chosen]
    logger.info("%d %s slice(s)%s of %d patient(s): --split %s%s, from %s's records", len(paths),
                "training" if training else "held-out", f" of class {class_name}" if class_name else "",
                len({part.patients[i] for i in chosen}), record["split"],
                f", --val_fraction {record['val_fraction']:g}, seed {record['seed']}"
                if record["split"] == "patient" else "", model_dir)
    return paths


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
