"""`adni-diffusers export`: a saved pipeline from a train_unet.py checkpoint (checkpoint-<step>), to sample, evaluate
or compare a run's earlier weights as its final pipeline is sampled: `generate --model`, `evaluate --model`,
`DiffusionPipeline.from_pretrained`.

A checkpoint holds what resuming needs (Accelerate's state: the UNet's weights as `model.safetensors`, with no
config; the EMA's weights by number in `training_state.safetensors`; the run's flags in `training_state.json`). The
pipeline is built as train_unet.py builds its final one: the run's VQModel, the UNet of the recorded config with
the EMA's weights where the run kept an EMA (the weights the final pipeline ships), the run's noise schedule."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


class ExportError(ValueError):
    """A checkpoint that cannot be made into a pipeline: the message names the folder and what to do."""


def _run_record(checkpoint: Path) -> dict:
    from .training import CHECKPOINT_RE

    state = checkpoint / "training_state.json"
    if not CHECKPOINT_RE.match(checkpoint.name) or not state.is_file():
        raise ExportError(f"{checkpoint}: not a training checkpoint (expected a checkpoint-<step> folder of a "
                          "train_unet.py --output_dir, holding training_state.json)")
    try:
        meta = json.loads(state.read_text(encoding="utf-8"))
        record, step = meta["run"], int(meta["step"])
        flags, identity = record["flags"], record["identity"]
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{state}: not a checkpoint record this package wrote ({type(e).__name__}: {e})") from None
    if record.get("stage") != "unet":
        raise ExportError(f"{checkpoint}: a {record.get('stage')} checkpoint; export makes a pipeline from a "
                          "train_unet.py checkpoint (a VQModel's is used by training on from it)")
    return {"step": step, "flags": flags, "identity": identity}


def _where_training_ran(run: Path, output_dir: str | None) -> Path | None:
    """The working folder of the training command, from the run's folder and its --output_dir as typed (relative):
    the run's path less those parts. None where that cannot be told (an absolute --output_dir, or one through ..)."""
    if not output_dir or Path(output_dir).is_absolute():
        return None
    typed = Path(os.path.normpath(output_dir)).parts
    if ".." in typed:
        return None
    # the run's path as given first: an --output_dir that is a link (ldm -> /scratch/me/ldm) ends in the link's name,
    # which the resolved path does not hold
    for here in (Path(os.path.abspath(run)).parts, run.resolve().parts):
        if here[-len(typed):] == typed:
            return Path(*here[:-len(typed)])
    return None


def _vqmodel_of(checkpoint: Path, record: dict, given: str | None) -> Path:
    """The VQModel the checkpoint's UNet trained on: --vqmodel, else the run's (its training_args.json), checked
    against the checkpoint's record of its files (another VQModel's latents mean nothing to this UNet)."""
    from .files import read_json_object
    from .latents import vqmodel_key
    from .train_unet import find_vqmodel
    from .training import TrainingError

    run = checkpoint.parent
    args = read_json_object(run / "training_args.json")
    recorded = args.get("vqmodel")
    candidates = [given] if given else [str(run / "vqvae")]  # a finished run's copy: the VQModel it trained on
    if not given and recorded:
        # --vqmodel as typed: relative to where training ran, which need not be here
        ran_in = _where_training_ran(run, args.get("output_dir"))
        candidates[:0] = [recorded, *([str(ran_in / recorded)] if ran_in and not Path(recorded).is_absolute() else [])]
    for candidate in candidates:
        try:
            vq_dir = find_vqmodel(candidate)
        except TrainingError as e:
            if given:
                raise ExportError(str(e)) from None
            continue
        if vqmodel_key(vq_dir) == record["identity"].get("vqmodel"):
            return vq_dir
        if given:
            raise ExportError(f"--vqmodel {given}: another VQModel than the one {checkpoint} trained on (its files "
                              "differ from the checkpoint's record of them)")
    raise ExportError(f"{checkpoint}: the VQModel it trained on is not found (the run's --vqmodel "
                      f"{recorded or '(not recorded)'}, as typed where the training ran, is not there, or was "
                      "trained on since): give --vqmodel its folder")


def _unet_weights(checkpoint: Path, unet, use_ema: bool) -> str:
    """Load the checkpoint's weights into `unet`: the EMA's where the run kept one. Returns which ("EMA", "model")."""
    import torch
    from safetensors.torch import load_file

    params = list(unet.parameters())
    if use_ema:
        ema_file = checkpoint / "training_state.safetensors"
        tensors = load_file(str(ema_file)) if ema_file.is_file() else {}
        ema = [tensors.get(f"ema.{i}") for i in range(len(params))]
        if any(t is None or t.shape != p.shape for t, p in zip(ema, params)) or f"ema.{len(params)}" in tensors:
            raise ExportError(f"{ema_file}: no EMA weights for this UNet, though the run trained with --use_ema "
                              "(a damaged or incomplete checkpoint?)")
        with torch.no_grad():
            for p, t in zip(params, ema):  # numbered as EMAModel keeps them: the UNet's parameters, in order
                p.copy_(t)
        return "EMA"
    weights = load_file(str(checkpoint / "model.safetensors"))
    # a DDP- or torch.compile-wrapped model's names, should a save have kept them
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}
    try:
        unet.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{checkpoint / 'model.safetensors'}: not the recorded UNet's weights "
                          f"({str(e).splitlines()[0]})") from None
    return "model"


def export_checkpoint(checkpoint, out, vqmodel: str | None = None):
    """Save checkpoint-<step> of a train_unet.py run as a pipeline folder `out`; returns the pipeline."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise ExportError(f"{checkpoint}: no such folder (a checkpoint-<step> folder of a train_unet.py run)")
    try:
        return _export(checkpoint, out, vqmodel)
    except (ExportError, OSError):
        if checkpoint.is_dir():
            raise
        # a live run's --checkpoints_total_limit removes its oldest checkpoint as it saves a new one: "not a training
        # checkpoint" (its record gone first) or a FileNotFoundError on its weights said nothing of that
        raise ExportError(f"{checkpoint}: removed while it was being read (a run saving a newer checkpoint removes "
                          "its oldest beyond --checkpoints_total_limit); export a newer checkpoint, or one of a run "
                          "that has ended") from None


def _export(checkpoint: Path, out: Path, vqmodel: str | None):
    import torch
    from diffusers import UNet2DModel, VQModel

    from .diffusion import make_noise_scheduler
    from .files import read_json_object
    from .pipeline_adni_ldm import ADNILatentDiffusionPipeline

    record = _run_record(checkpoint)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty folder; choose a new one")
    flags = record["flags"]
    vq_dir = _vqmodel_of(checkpoint, record, vqmodel)
    class_names = None
    if flags.get("conditional"):
        class_names = read_json_object(checkpoint.parent / "training_data.json").get("class_names")
        wanted = record["identity"]["model_config"].get("num_class_embeds")
        if not class_names or len(class_names) + 1 != wanted:
            raise ExportError(f"{checkpoint.parent / 'training_data.json'}: its class names "
                              f"({', '.join(class_names or []) or 'none'}) do not fit the checkpoint's UNet "
                              f"({wanted} class embeddings, one per class and one for 'no label')")
    unet = UNet2DModel(**record["identity"]["model_config"])
    weights = _unet_weights(checkpoint, unet, bool(flags.get("use_ema")))
    scheduler = make_noise_scheduler(flags["num_train_timesteps"], flags["beta_schedule"], flags["beta_start"],
                                     flags["beta_end"], flags["prediction_type"])
    vq = VQModel.from_pretrained(vq_dir, use_safetensors=True)
    pipe = ADNILatentDiffusionPipeline(vqvae=vq, unet=unet.eval(), scheduler=scheduler, class_names=class_names,
                                       preprocess=flags.get("preprocess", "pad"))
    with torch.no_grad():
        pipe.save_pretrained(out)
    # the run's records travel with it: its split (evaluate and held-out find the held-out slices from it) and its
    # arguments (the card's table and seed); and where the weights came from (the card says which step)
    for name in ("training_data.json", "training_args.json"):
        if (checkpoint.parent / name).is_file():
            shutil.copyfile(checkpoint.parent / name, out / name)
    from .train_unet import FIRST_STAGE_FILES, first_stage_file

    # and the first stage's numbers and arguments, as the final pipeline keeps them (the card's VQ sections)
    for name in FIRST_STAGE_FILES:
        if (source := first_stage_file(vq_dir, name)) is not None:
            shutil.copyfile(source, out / name)
    (out / "exported_from.json").write_text(json.dumps(
        {"checkpoint": str(checkpoint.resolve()), "step": record["step"], "weights": weights,
         "vqmodel": str(vq_dir.resolve())}, indent=2))
    from .model_card import write_model_card

    # its card (which step, which weights, the run's arguments) and, for a demo model, the MNI template's notice,
    # which goes with every copy of the weights
    write_model_card(out)
    logger.info("checkpoint %s (step %d, the %s weights) saved as a pipeline in %s: adni-diffusers generate --model "
                "%s --out samples", checkpoint, record["step"], weights, out, shlex.quote(str(out)))
    return pipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint-<step> folder of a train_unet.py --output_dir")
    parser.add_argument("--out", required=True, help="a new folder for the pipeline")
    parser.add_argument("--vqmodel", default=None,
                        help="the VQModel the run trained on, if it moved since (default: the run's --vqmodel)")


def main(args: argparse.Namespace) -> int:
    export_checkpoint(args.checkpoint, args.out, args.vqmodel)
    return 0
