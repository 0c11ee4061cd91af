"""The model card (README.md) of a saved model, rendered from the files beside it.

A pipeline folder (`model_index.json`, from train_unet.py) gets `pipeline_card.md`, a Jinja template
rendered by huggingface_hub's `ModelCard.from_template`, with diffusers' `populate_model_card`
adding the tags. A first-stage folder (`vqvae/`, from train_vqmodel.py) gets the shorter
`VQ_CARD_TEMPLATE` below. Everything the card says is read from the folder:

    model_index.json, vqvae/ unet/ scheduler/ configs   what the model is (sizes from safetensors headers)
    training_data.json                                  data source (demo or user), sizes, split
    training_args.json                                  the training arguments (no token: never written), and an
                                                        earlier session's where they differed (a resumed run)
    train_metrics.json, loss_curve.png, samples.png     training outcome
    evaluation/metrics.json (else metrics.json)         evaluation numbers, when they exist

so the card can be re-rendered at any time: after evaluation (`render_model_card(dir)`), and by
`adni-diffusers push`, which renders it for the repo id it pushes to. Rendering is deterministic
(same files -> same bytes). Cards start with `CARD_MARKER`; a README.md without it is the user's own
and is never replaced by a push.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import struct
from pathlib import Path, PureWindowsPath

from .files import read_json_object

logger = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("pipeline_card.md")
CARD_FILE = "README.md"
LICENSE_FILE = "LICENSE.md"
CARD_MARKER = "<!-- adni-diffusers model card"
EVALUATION_FILES = ("evaluation/metrics.json", "metrics.json")  # first found wins (pipeline folders)
PLACEHOLDER_NAMESPACE = "your-user"
PACKAGE_TAG = "adni-diffusers"
BASE_TAGS = ["medical-imaging", "mri", "brain", "alzheimers"]
MNI_NOTICE = (
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, "
    "McGill University. Permission to use, copy, modify, and distribute this software and its documentation for "
    "any purpose and without fee is hereby granted, provided that the above copyright notice appear in all copies. "
    "The authors and McGill University make no representations about the suitability of this software for any "
    "purpose. It is provided \"as is\" without express or implied warranty."
)
ADNI_ACKNOWLEDGEMENT = (
    "Data used in preparation of this article were obtained from the Alzheimer's Disease Neuroimaging Initiative "
    "(ADNI) database (adni.loni.usc.edu)."
)

# The training arguments the card shows (all of them are in training_args.json), in this order.
_ARG_LABELS = [
    ("preset", "model size preset"),
    ("conditional", "class-conditional"),
    ("cond_dropout", "label dropout (for guidance)"),
    ("max_train_steps", "max training steps"),
    ("num_epochs", "epochs (when no max steps)"),
    ("train_batch_size", "batch size per process"),
    ("gradient_accumulation_steps", "gradient accumulation"),
    ("learning_rate", "learning rate"),
    ("scale_lr", "learning rate scaled by batch"),
    ("lr_scheduler", "learning-rate schedule"),
    ("lr_warmup_steps", "warm-up steps"),
    ("adam_weight_decay", "AdamW weight decay"),
    ("max_grad_norm", "gradient clipping"),
    ("use_ema", "EMA of the weights"),
    ("ema_max_decay", "EMA max decay"),
    ("mixed_precision", "mixed precision"),
    ("num_train_timesteps", "diffusion timesteps"),
    ("beta_schedule", "beta schedule"),
    ("beta_start", "beta start"),
    ("beta_end", "beta end"),
    ("prediction_type", "prediction target"),
    ("loss", "loss"),
    ("snr_gamma", "Min-SNR-gamma loss weighting"),
    ("rec_loss", "reconstruction loss"),
    ("ssim_weight", "SSIM loss weight"),
    ("codebook_weight", "codebook loss weight"),
    ("commitment_beta", "commitment weight"),
    ("codebook_restart_steps", "dead-code restart every"),
    ("disc_weight", "adversarial loss weight"),
    ("disc_start", "discriminator start step"),
    ("split", "validation split"),
    ("val_fraction", "held-out patient fraction"),
    ("preprocess", "how slices were brought to 256 x 256 (pad, resize or fit)"),
    ("seed", "seed"),
]
_ONLY_IF = {  # shown only when the argument named on the right is truthy
    "cond_dropout": "conditional", "ema_max_decay": "use_ema", "val_fraction": "split=patient",
    "num_epochs": "not max_train_steps", "disc_start": "disc_weight",
    # diffusers' squaredcos_cap_v2 ignores beta_start / beta_end (the scheduler row says "cosine betas")
    "beta_start": "beta_schedule!=squaredcos_cap_v2", "beta_end": "beta_schedule!=squaredcos_cap_v2",
}

_VQ_METRICS = [  # first-stage reconstruction numbers (metrics.json of train_vqmodel.py)
    ("psnr", "PSNR (dB), whole slice"),
    ("ssim", "SSIM, whole slice"),
    ("ms_ssim", "MS-SSIM, whole slice"),
    ("psnr_brain", "PSNR (dB), inside the brain mask"),
    ("ssim_brain", "SSIM, inside the brain mask"),
    ("codebook_usage", "share of codebook entries used"),
    ("code_perplexity", "code perplexity"),
    ("eval_images", "images measured"),  # held-out ones, or training ones with --split all (eval_set says)
    ("brain_eval_images", "images with a brain mask (the brain rows' mean)"),
]
_SSIM_KEYS = ("ssim", "ms_ssim", "ssim_brain")
# metrics.json from before 2026-12-02 has no ssim_scale: its SSIMs were computed on [-1, 1] with data_range 2, where
# the same reconstructions score higher (luminance is not shift-invariant: one demo VQModel's SSIM was 0.845 there and
# 0.607 on [0, 1], benchmarks/results/cpu-2026-12-02-ssim-scale.json)
_OLD_SSIM_SCALE = "[-1, 1], data_range 2: before 2026-12-02"


def _vq_rows(metrics: dict) -> list[tuple[str, str]]:
    """The first stage's metric rows; SSIM rows say the scale they were computed on (the two are not comparable)."""
    scale = metrics.get("ssim_scale") or _OLD_SSIM_SCALE
    return [(f"{label} (images on {scale})" if k in _SSIM_KEYS else label, _fmt(metrics[k]))
            for k, label in _VQ_METRICS if k in metrics]


# ----------------------------------------------------------------------------- reading the folder
def _field(record: dict, key: str, kind: type = dict):
    """record[key] when it is a `kind` (else None): a hand-edited or foreign record with, say, "train_steps": "4"
    renders without that line instead of failing the card (and with it evaluate's re-render and push)."""
    value = record.get(key)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None  # True is an int too


def _count_parameters(component_dir: Path) -> int | None:
    """Parameters of a saved diffusers model, from its safetensors headers (no torch needed): its main weights,
    else (a folder saved with `variant="fp16"` only) the first variant's, each counted once over its shards."""
    saved = sorted(Path(component_dir).glob("*.safetensors"))
    files = [p for p in saved if re.fullmatch(r"diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors", p.name)]
    if not files:
        variants = sorted({m.group(1) for p in saved
                           if (m := re.fullmatch(r"diffusion_pytorch_model\.([^.-]+)(-\d+-of-\d+)?\.safetensors", p.name))})
        files = [p for p in saved if variants and re.fullmatch(
            rf"diffusion_pytorch_model\.{re.escape(variants[0])}(-\d+-of-\d+)?\.safetensors", p.name)]
    if not files:
        return None
    total = 0
    for path in files:
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error):
            return None
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def _millions(n: int | None) -> str:
    """Parameters in millions, to two significant figures below 1M (the tiny UNet's 177,908: 0.18M, as README's
    preset table says, not 0.2M)."""
    if n is None:
        return "?"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e6:.3f}M"


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _count(n, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numeric_rows(metrics: dict) -> list[tuple[str, str]]:
    """The numbers at the top level of a metrics file, and [low, high] pairs (intervals) as ranges."""
    return [(k, _fmt(v) if _is_number(v) else f"{_fmt(v[0])} to {_fmt(v[1])}") for k, v in metrics.items()
            if _is_number(v) or (isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)))]


def _evaluation(model_dir: Path, names=EVALUATION_FILES) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """The table's rows, the file they come from, and how its samples were made and measured."""
    for name in names:
        metrics = read_json_object(model_dir / name)
        if rows := _numeric_rows(metrics):
            return rows, name, _evaluation_settings(metrics)
    return [], None, None


FIRST_STAGE_UNCONFIRMED = ("the UNet's records hold no record of the patients its VQModel (first stage) held out, so "
                           "that the VQModel never trained on the held-out slices cannot be confirmed: the VQ ceiling "
                           "and the samples' decoding may look better on them than on unseen patients")


def held_out_caveats(data: dict) -> list[str]:
    """What may make an evaluation's held-out slices not new to the model, from its record (metrics.json's `data`):
    evaluate's report warns of each in bold, and the card says it beside the numbers (it had shown them without a
    word: a helper's audit, 2026-12-06)."""
    caveats = []
    if data.get("matches_training", True) is False:
        caveats.append("the split differs from the one recorded at training time; the data changed, so the held-out "
                       "images may include images the model saw")
    elif data.get("matches_training", True) is None:
        caveats.append("the model's folder holds no record of its training split (training_data.json without train / "
                       "validation summaries), so that the held-out images are ones the model never saw cannot be "
                       "confirmed")
    if data.get("first_stage_held_out") is False:
        caveats.append("the VQModel (first stage) held out other patients than the UNet, or other images of them (it "
                       "was trained on another folder or split, or on the data before it changed), so it may have "
                       "trained on held-out slices: the VQ ceiling and the samples' "
                       "decoding may look better on them than on unseen patients")
    elif data.get("first_stage_unconfirmed"):
        caveats.append(FIRST_STAGE_UNCONFIRMED)
    return caveats


def one_patient_classes(groups, group_names: list[str]) -> str:
    """"The held-out images of AD and NC are of one patient each": the classes (`groups`: indices into
    `group_names`, the classes or ["all"]) whose evaluation ranges hold no patient-to-patient chance (evaluate's
    report and summary, and the card)."""
    names = [group_names[g] if isinstance(g, int) and 0 <= g < len(group_names) else str(g) for g in sorted(groups)]
    if names == ["all"]:
        return "The held-out images are of one patient"
    return f"The held-out images of {in_words(names)} are of one patient{' each' * (len(names) > 1)}"


def in_words(names: list[str]) -> str:
    """"AD", "AD and NC", "CN, MCI and AD" ("CN and MCI and AD" read as a stammer)."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 2 else names)


def _one_patient_note(metrics: dict) -> str | None:
    """Where a class's held-out images are of one patient, the interval rows hold no patient-to-patient chance
    (evaluate's report says so in bold; the card's readers on the Hub had the ranges alone)."""
    realism = _field(metrics, "realism") or {}
    groups = set()
    for intervals in (_field(realism, "fd_intervals"), _field(_field(metrics, "memorisation") or {}, "intervals")):
        groups.update((intervals or {}).get("groups_of_one_patient") or [])
    if not groups:
        return None
    return (f"{one_patient_classes(groups, list(_field(realism, 'images_per_class') or {}))}: the interval rows hold "
            "no patient-to-patient chance there, so they are narrower than the truth (a larger `--num-samples`, "
            "where more patients are held out, gives ranges that reach other patients).")


def precision_note(settings: dict) -> str:
    """"in float16" where an evaluation sampled in another precision than float32, else "": it moves the numbers
    (float16: FD 34.40 against 34.49 in float32). The report's and the card's settings lines both say it."""
    dtype = settings.get("dtype")
    return f"in {dtype}" if dtype not in (None, "float32") else ""


def _evaluation_settings(metrics: dict) -> str | None:
    """"100 samples per class from `dpm++` with 25 steps, guidance 2, seed 0; in the feature net ...": what
    another evaluation must share for its numbers to compare with these (evaluate's metrics.json records it)."""
    st, net = _field(metrics, "settings") or {}, _field(metrics, "feature_net") or {}
    if not all(k in st for k in ("num_samples", "scheduler", "steps", "seed")):
        return None
    text = (f"{st['num_samples']} samples {'per class' if st.get('samples_per') == 'class' else 'in all'} from "
            f"`{st['scheduler']}` with {st['steps']} steps"
            + (f", guidance {_fmt(st['guidance'])}" if st.get("samples_per") == "class" and "guidance" in st else "")
            + (f", refinement {st['refine_steps']} x {st['refine_repeats']}" if st.get("refine_repeats") else "")
            + f", seed {st['seed']}" + (f", {note}" if (note := precision_note(st)) else ""))
    if isinstance(net.get("weights_sha256"), str):
        text += f"; measured in the feature net with weights sha256 `{net['weights_sha256'][:16]}`"
        floor = net.get("floor_patients") if isinstance(net.get("floor_patients"), dict) else {}
        # evaluations since a280a2f (2026-12-05): the floor's patients are kept out of the net's training
        if floor.get("set_aside") and isinstance(floor.get("patients"), int):
            text += (f", the floor's training slices from {_count(floor['patients'], 'patient')} kept out of its "
                     "training")
    return text


def _shown(key: str, args: dict) -> bool:
    cond = _ONLY_IF.get(key)
    if cond is None:
        return True
    if cond == "split=patient":
        return args.get("split") == "patient"
    if "!=" in cond:
        name, value = cond.split("!=", 1)
        return args.get(name) != value
    if cond.startswith("not "):
        return not args.get(cond[4:])
    return bool(args.get(cond))


def _environment_text(args: dict) -> str | None:
    """"adni-diffusers 0.1.0 (git 2f92c53aa1b2), torch 2.14.1 (CUDA 13.0), diffusers 0.42.1, accelerate 1.16.0, on
    NVIDIA H100 80GB HBM3, 2 processes": what trained the model, from training_args.json's `environment` (runs since
    2026-12-05); None before."""
    env = _field(args, "environment") or {}
    if not env.get("torch"):
        return None
    package = f"adni-diffusers {env.get('adni_diffusers') or '?'}" + (f" (git {env['git_commit']})"
                                                                      if env.get("git_commit") else "")
    torch_text = f"torch {env['torch']}" + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")
    libraries = ", ".join(f"{name} {env[name]}" for name in ("diffusers", "accelerate") if env.get(name))
    processes = args.get("num_processes") if isinstance(args.get("num_processes"), int) else 1
    return (f"{package}, {torch_text}, {libraries}, Python {env.get('python', '?')}, on {env.get('device', '?')}"
            + (f", {processes} processes" if processes > 1 else ""))  # not "2 cores x 2": a core count


def _ema_text(args: dict, reached=None, model: str = "UNet",
              numbers: str = "the validation loss, the samples and any evaluation") -> str | None:
    """Which weights the card's numbers are of: a reader of the Methods section asks whether the saved model is the
    EMA (the scripts copy the EMA into it before the final numbers and the save); None where the record does not
    say. `reached`: the decay at the last step (the UNet's train_metrics.json and the VQModel's metrics.json since
    2026-12-06): a short run's warm-up ends far below --ema_max_decay (0.79 after 8 steps, about 0.992 after the CPU
    demo's 650)."""
    if not isinstance(args.get("use_ema"), bool):
        return None
    if not args["use_ema"]:
        return f"The saved {model} weights are those of the last training step (no EMA)."
    decay = args.get("ema_max_decay")
    warm_up = (f"decay warming up to {_fmt(decay)}" + (f", {_fmt(reached)} at the last step"
                                                        if _is_number(reached) and reached != decay else "")
               if isinstance(decay, float) else None)
    return (f"The saved {model} weights are the exponential moving average (EMA) of the training weights"
            + (f" (diffusers' `EMAModel`, {warm_up})" if warm_up else "")
            + f": {numbers} are of these weights.")


def _argument_rows(args: dict, steps_run=None) -> list[tuple[str, str, str]]:
    """`steps_run`: the optimizer steps the record says the run took (train_metrics.json / metrics.json
    train_steps), for a run bounded by --num_epochs (no --max_train_steps)."""
    rows = []
    for key, label in _ARG_LABELS:
        if key in args and _shown(key, args):
            value = args[key]
            used = args.get("mixed_precision_used") if key == "mixed_precision" else None
            if key == "mixed_precision" and value is None:  # left to Accelerate (its config file, else its default)
                value = f"{used} (not given: what Accelerate chose)" if used else "not given: what Accelerate chose"
            elif used and used != value:  # fp16 asked for on a CPU, which trains in float32 there
                value = _precision_text(value, used)
            elif key == "preset" and isinstance(value, str):  # a JSON file's path names a home folder: its name only
                value = PureWindowsPath(value).name or value
            elif key == "lr_warmup_steps" and value and args.get("lr_scheduler") == "constant":
                value = f"{_fmt(value)} (not used: diffusers' constant schedule has no warm-up)"
            elif key == "lr_warmup_steps" and (note := _warmup_note(args, steps_run)):
                value = f"{_fmt(value)} ({note})"
            elif key == "learning_rate" and _is_number(rate := args.get("learning_rate_used")) and rate != value:
                value = f"{_fmt(value)} ({_fmt(rate)} used: --scale_lr for the global batch)"
            elif key == "train_batch_size" and _is_number(total := args.get("global_batch_size")) and total != value:
                value = f"{_fmt(value)} (global batch {total})"
            rows.append((f"`--{key}`", _fmt(value), label))
    return rows


def _python_string(text: str) -> str:
    """`text` as a Python string literal in double quotes (JSON's escapes are Python's; non-ASCII kept as it is)."""
    return json.dumps(text, ensure_ascii=False)


def _warmup_note(args: dict, steps_run=None) -> str | None:
    """Where the warm-up is not shorter than the run (training warns too): the share of --learning_rate reached.
    A run bounded by --num_epochs records no --max_train_steps: its length is the steps it took (`steps_run`)."""
    warmup, steps = args.get("lr_warmup_steps"), args.get("max_train_steps")
    if steps is None and isinstance(steps_run, int) and not isinstance(steps_run, bool):
        steps = steps_run
    if not (isinstance(warmup, int) and isinstance(steps, int) and 0 < steps <= warmup):
        return None
    if (args.get("lr_scheduler") or "constant") == "constant":  # diffusers' constant schedule has no warm-up
        return None
    # step k trains at (k - 1) / warmup of it: the schedule steps after each optimizer step, from 0
    return f"not below the run's {steps} steps: the rate peaked at {(steps - 1) / warmup:.0%} of the learning rate"


def _precision_text(asked, used) -> str:
    """--mixed_precision `asked` that trained in `used` (precision_in_effect): fp16 asked for on a CPU."""
    return f"{asked} (did nothing on the CPU: trained in {'float32' if used == 'no' else used})"


def _session_settings(changed: dict) -> str:
    """An earlier session's differing settings as the card words them: the table's flags and how it ran (the
    others only counted: a path among them, an output or data folder moved, would name a local folder)."""
    shown, told = [], set()  # told: the keys of `changed` that `shown` words
    for key, _ in _ARG_LABELS:
        if key in changed:
            value, text = changed[key], None
            if key == "preset" and isinstance(value, str):
                value = PureWindowsPath(value).name or value
            used = changed.get("mixed_precision_used") if key == "mixed_precision" else None
            if used and value and used != value:  # fp16 asked for on a CPU: says what it trained in
                text, told = _precision_text(value, used), told | {"mixed_precision_used"}
            shown.append(f"`--{key}` {text or _fmt(value)}")
            told.add(key)
    if "mixed_precision_used" in changed and "mixed_precision_used" not in told:
        told.add("mixed_precision_used")
        if used := changed["mixed_precision_used"]:  # (None: a record from before it was kept)
            shown.append(f"trained in {'float32' if used == 'no' else _fmt(used)}")
    if isinstance(changed.get("num_processes"), int):
        shown.append(_count(changed["num_processes"], "process", "processes"))
        told.add("num_processes")
    # what a process count changes with it (recorded since 2026-12-06)
    if _is_number(changed.get("global_batch_size")):
        shown.append(f"global batch {changed['global_batch_size']}")
        told.add("global_batch_size")
    if _is_number(changed.get("learning_rate_used")):
        shown.append(f"learning rate {_fmt(changed['learning_rate_used'])} used")
        told.add("learning_rate_used")
    if "compiled" in changed:
        shown.append("compiled" if changed["compiled"] else "not compiled")
        told.add("compiled")
    if "environment" in changed:  # a resume after an upgrade, or on another machine
        shown.append(f"{_environment_text(changed) or 'other software (not recorded)'}")
        told.add("environment")
    others = len(set(changed) - told)
    if others:
        shown.append(f"{_count(others, 'other setting')} (`training_args.json`)")
    return ", ".join(shown)


def _session_lines(args: dict) -> list[str]:
    """One line per earlier session of a resumed run (training_args.json's `earlier_sessions`): the table above
    shows the last session's settings, and these say where the earlier ones differed."""
    sessions = [s for s in args.get("earlier_sessions") or [] if isinstance(s, dict)]
    ends = [s.get("started_at_step") for s in sessions[1:]] + [args.get("started_at_step")]
    lines = []
    for session, end in zip(sessions, ends):
        start = session.get("started_at_step")
        steps = (f"Steps {start} to {end}" if isinstance(start, int) and isinstance(end, int)
                 else f"The steps before {end}" if isinstance(end, int) else "Earlier steps")
        changed = session.get("changed") if isinstance(session.get("changed"), dict) else {}
        what = _session_settings(changed) if changed else "the same settings"
        lines.append(f"{steps} ran in an earlier session (resumed from its checkpoint) with {what}.")
    start = args.get("started_at_step")
    if not sessions and isinstance(start, int) and start > 0:  # resumed from another folder's checkpoint
        lines.append(f"The last session resumed at step {start}; the settings of the steps before it are not recorded.")
    return lines


def _latent_size(vq: dict):
    """Side of the latent of a 256 x 256 slice: every down block of the VQ encoder but the last halves it."""
    blocks = vq.get("down_block_types")
    return 256 // 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else "?"


def _class_names(value) -> list[str]:
    """model_index.json's class_names: a list, or a {name: index} mapping (ordered by index)."""
    if isinstance(value, dict):
        return sorted(value, key=lambda name: value[name])
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def _per_class(summary: dict, class_names: list[str] | None = None) -> str:
    """"AD 80, NC 60"; a class of `class_names` with no image in the set as 0 (it was left out: "CN 4, ad 4" of a
    three-class model read as a two-class validation set)."""
    per_class = _field(summary, "per_class") or {}
    if per_class and class_names and set(per_class) <= set(class_names):
        per_class = {name: per_class.get(name, 0) for name in class_names}
    return ", ".join(f"{name} {count}" for name, count in per_class.items()) or "-"


def _data_context(data: dict, args: dict, source: str) -> dict:
    train, val = data.get("train") or {}, data.get("validation") or {}
    split = data.get("split") or args.get("split")
    if split == "patient":
        n_train, n_val = train.get("patients"), val.get("patients")
        if isinstance(n_train, int) and isinstance(n_val, int):
            share = f"{n_val} of {n_train + n_val} patients"
        else:
            fraction = args.get("val_fraction")
            share = f"{fraction:.0%} of the patients" if isinstance(fraction, (int, float)) else "some patients"
        seed = args.get("split_seed") if args.get("split_seed") is not None else args.get("seed", "?")
        rule = _patient_rule(data, args, source)
        if rule == "file":  # a LONI file name's patient part names one scan: a subject's visits are several
            split_text = (f"{share} held out for validation by the patient part of each file name (seed {seed}); "
                          f"with LONI file names that is one scan, so one subject's visits may be on both sides")
        elif rule == "subject-2026-12-03":
            split_text = (f"{share} held out for validation as whole patients (seed {seed}), by an older rule that "
                          f"counted a subject named two ways (002_S_0295, sub-ADNI002S0295) twice, so such a "
                          f"subject may have slices on both sides")
        else:
            split_text = (f"{share} held out for validation as whole patients (seed {seed}), so no "
                          f"patient has slices on both sides")
    elif split == "given":
        split_text = "the folder's own: its `train/` for training, its `test/` for validation"
        if data.get("shared_patients"):
            split_text += (f"; {data['shared_patients']} patients have slices on both sides, so the validation "
                           "set is not entirely unseen")
    elif split == "all":
        split_text = "none: every slice was used for training (no held-out validation set)"
    else:
        split_text = "not recorded"
    preprocess = data.get("preprocess") or args.get("preprocess")
    preprocess_text = {
        "pad": "slices were padded with black rows to 256 x 256 (anatomy not stretched; ADNI's 256 x 240 slices "
               "get 16 rows)",
        "resize": "slices were resized to 256 x 256 (ADNI's 256 x 240 slices are stretched by 6.7% vertically)",
        "fit": "slices were scaled to 256 on their longer side, proportions kept, and padded with black to 256 x 256 "
               "(ADNI's 256 x 240 slices get 16 rows, as padding gives them)",
    }.get(preprocess, "not recorded")
    rows = []
    if train:
        rows.append(("training", train.get("images", "?"), train.get("patients", "?"),
                     _per_class(train, _recorded_classes(data))))
    if val.get("images"):
        rows.append(("validation", val.get("images", "?"), val.get("patients", "?"),
                     _per_class(val, _recorded_classes(data))))
    # never the full local path; PureWindowsPath takes both separators: a model trained on Windows, its card
    # rendered on Linux (a push, evaluate), took all of C:\Users\<name>\... for the folder's name
    root = PureWindowsPath(str(data.get("root") or ""))
    # a share's root (//host/share) has no name: the share's name stands for it
    root_name = root.name or root.drive.replace("/", "\\").rstrip("\\").split("\\")[-1] or "?"
    total = sum(r[1] for r in rows if isinstance(r[1], int))
    # "trained on N slices" must not count the held-out ones (a --split given test/ folder is a third of ADNI)
    counts = {name: n for name, n, *_ in rows if isinstance(n, int)}
    split_counts = (f"{counts.get('training', '?')} for training, {counts['validation']} held out"
                    if "validation" in counts else "all for training")
    if source == "demo":
        summary = f"the synthetic demo set ({total} slices: {split_counts}; not ADNI)"
    elif source == "user":
        summary = f"{total} axial slices from an ADNI-style folder (`{root_name}`: {split_counts})"
    else:
        summary = "data that was not recorded"
    return {"data_rows": rows, "split_text": split_text, "preprocess_text": preprocess_text,
            "data_root_name": root_name, "data_summary": summary, "total_images": total}


# what a shipped pipeline file from before its version check (838fd57, 2026-12-05) loads with: diffusers 0.33 to
# 0.36 fail on its string annotations (KeyError: 'class_names'); 0.38.0 and 0.42.1 were checked (README)
OLD_FILE_DIFFUSERS = "0.38"


def shipped_file_diffusers(model_dir: Path, pipeline_file: str) -> tuple[str, bool]:
    """The oldest diffusers the folder's own pipeline file loads with, and whether it checks that itself. A card
    re-rendered for a pipeline saved by an older version said "0.26 or newer (it says so...)" of a file that did
    not say so, and failed on 0.33 to 0.36."""
    from .pipeline_adni_ldm import MIN_DIFFUSERS

    path = model_dir / pipeline_file
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    if text is None:  # (a card rendered before the file is there): this version's
        return ".".join(map(str, MIN_DIFFUSERS)), True
    if found := re.search(r"^MIN_DIFFUSERS = \((\d+), (\d+)\)", text, re.M):
        return f"{found.group(1)}.{found.group(2)}", True
    return OLD_FILE_DIFFUSERS, False


def shipped_file_gives_slice_size(model_dir: Path, pipeline_file: str) -> bool:
    """Whether the folder's own pipeline file takes `slice_size` (since 2026-12-07; this version's where the file is
    not there yet): the card offers it only then."""
    path = model_dir / pipeline_file
    return not path.is_file() or "def to_slice_size(" in path.read_text(encoding="utf-8", errors="replace")


def _repo_id(model_dir: Path, args: dict, repo_id: str | None) -> tuple[str, bool]:
    """(repo id for the code snippets, whether it is a placeholder)."""
    if repo_id and "/" in repo_id:
        return repo_id, False
    name = repo_id or args.get("hub_model_id") or model_dir.resolve().name
    if "/" in name:
        return name, False
    return f"{PLACEHOLDER_NAMESPACE}/{name}", True


def _license(source: str, model_dir: Path) -> dict:
    """`license: other` needs a name; the link (the Hub's convention) only where the folder has the file."""
    name = "mni-icbm152-2009-notice" if source == "demo" else "adni-data-use-agreement"
    path = model_dir / LICENSE_FILE
    # a demo UNet on a first stage of real data keeps the MNI notice in LICENSE.md: not the licence's text to link
    mni_notice = _holds_mni_notice(path)
    link = {"license_link": LICENSE_FILE} if path.is_file() and (source == "demo" or not mni_notice) else {}
    return {"license_name": name, **link}


def _holds_mni_notice(path: Path) -> bool:
    """Whether `path` is the LICENSE.md a demo model gets (write_demo_license)."""
    return path.is_file() and path.read_text(encoding="utf-8", errors="replace") == DEMO_LICENSE_TEXT


def _card_data(source: str, model_dir, tags: list[str], **extra):
    from huggingface_hub import ModelCardData

    return ModelCardData(license="other", **_license(source, Path(model_dir)), tags=tags, **extra)


DEMO_LICENSE_TEXT = ("# Notice of the training images\n\nThe training images of this model derive from the MNI "
                     "ICBM152 2009 template (as bundled with nilearn). Its notice:\n\n> " + MNI_NOTICE + "\n")


def write_demo_license(output_dir) -> Path | None:
    """A model of the demo set carries the MNI template's notice as LICENSE.md (the card links to it).

    Only for the demo set: the terms of ADNI data are the user's agreement, which this package cannot
    write; a LICENSE.md the user puts in the folder is linked and pushed all the same."""
    path = Path(output_dir) / LICENSE_FILE
    if path.exists():
        return None
    path.write_text(DEMO_LICENSE_TEXT, encoding="utf-8")
    return path


def remove_demo_license(output_dir) -> None:
    """A model of other data in a folder a demo model had (--overwrite_output_dir): the MNI notice written for
    that model is not its licence (the card linked it, and a push uploaded it). A LICENSE.md of the user's stays."""
    path = Path(output_dir) / LICENSE_FILE
    try:
        if path.read_text(encoding="utf-8") == DEMO_LICENSE_TEXT:
            path.unlink()
    except (OSError, UnicodeDecodeError):
        pass


def _populate(card, tags: list[str]):
    """diffusers' helper: library_name "diffusers" plus the tags."""
    from diffusers.utils.hub_utils import populate_model_card

    return populate_model_card(card, tags=tags)


def _files_listing(model_dir: Path) -> list[str]:
    """What a push uploads (top-level names; folders end with '/'): not the pictures of real slices it withholds."""
    from .hub import PUSH_RECORD, is_demo_trained, select_upload_files, shows_real_slices

    kind, files = select_upload_files(model_dir)
    demo = is_demo_trained(model_dir)
    files = [p for p in files if not shows_real_slices(model_dir, p, demo)]
    names = []
    for path in files:
        name = path.split("/")[0] + ("/" if "/" in path else "")
        if name not in names:
            names.append(name)
    if CARD_FILE not in names:
        names.append(CARD_FILE)
    if kind in ("pipeline", "vqmodel") and PUSH_RECORD not in names:  # the push's record of what it uploaded
        names.append(PUSH_RECORD)
    return sorted(names, key=lambda n: (n.endswith("/") is False, n))


# ----------------------------------------------------------------------------- pipeline card
def _attention_text(down_block_types: list[str], sample_size, middle: bool) -> str:
    """Where the UNet has self-attention: its Attn* down blocks (down block i works at sample_size / 2^i), the
    middle block."""
    levels = [i for i, b in enumerate(down_block_types) if "Attn" in b]
    if not levels:
        return "self-attention in the middle block only" if middle else "no self-attention"
    if levels == list(range(len(down_block_types) - len(levels), len(down_block_types))):  # as the presets put it
        where = "the lowest resolution" if len(levels) == 1 else f"the {len(levels)} lowest resolutions"
    else:  # a JSON preset may put it elsewhere: name the resolutions
        sizes = [f"{sample_size >> i}x{sample_size >> i}" if isinstance(sample_size, int) else f"level {i + 1}"
                 for i in levels]
        where = "the " + ", ".join(sizes) + " latent resolution" + ("s" if len(levels) > 1 else "")
    return f"self-attention at {where}" + (" and in the middle block" if middle else "")


def _data_source(model_dir: Path, given: str | None = None) -> str:
    """"demo", "user" or "unknown": as given, else as the training records say; "user" for a demo-trained UNet
    whose first stage's records name other data (the licence and warnings follow the real data)."""
    from .hub import first_stage_sources

    source = _own_data_source(model_dir, given)
    return "user" if source == "demo" and any(s != "demo" for s in first_stage_sources(model_dir)) else source


def _own_data_source(model_dir: Path, given: str | None = None) -> str:
    """What this stage itself (the UNet of a pipeline) was trained on: as given, else as its records say."""
    return (given or read_json_object(model_dir / "training_data.json").get("source")
            or read_json_object(model_dir / "metrics.json").get("data_source") or "unknown")


def _first_stage_text(data: dict, own: str, source: str, first_stage: list) -> str | None:
    """Where the first stage learned from other data than the UNet: what, in a few words (the card's data
    section otherwise describes only the UNet's)."""
    if own == source:
        return None
    vq = _field(data, "vqmodel_data") or {}
    root = PureWindowsPath(str(vq.get("root") or "")).name if vq.get("source") == "user" else ""
    what = (f"slices from an ADNI-style folder (`{root}`)" if root else "real slices, not the demo set"
            if "user" in first_stage else "data its records do not name as the demo set")
    return (f"the VQ autoencoder (`vqvae/`) was trained on other data: {what}; the licence and cautions below are "
            "those of real data")


def _recorded_classes(data: dict) -> list[str] | None:
    """The class folders training_data.json names: [] for a folder without any (unlabelled), None if not recorded."""
    names = data.get("class_names")
    return [str(n) for n in names] if isinstance(names, list) else None


def _data_layout(data: dict, class_names: list[str]) -> str | None:
    """How the data folder was laid out, as far as the records say: its class folders, or none (an unlabelled
    folder was described as `train/` and `test/` with one sub-folder per class, whatever its layout)."""
    names = _recorded_classes(data)
    if names is None:
        names = class_names or None
    if names is None:
        return None
    split = "`train/` and `test/`, each with " if data.get("split") == "given" else ""
    if not names:
        return f"{split}no class folders: unlabelled slices"
    if len(names) == 1:
        return f"{split}one class folder: {names[0]}"
    return f"{split}one sub-folder per class: {', '.join(names)}"


def _scope_text(data: dict, class_names: list[str]) -> str:
    """The card's scope line: which classes the model knows. An unlabelled folder's model was said to know "only the
    classes of the training folder (no MCI, ...)", a one-class folder's did not name its class."""
    recorded = _recorded_classes(data)
    names = class_names or recorded or []
    # a model of MCI (or EMCI / LMCI) slices is not said to know no MCI
    other = ("no other diagnoses or dementias" if any("MCI" in name.upper() for name in names)
             else "no MCI, no other dementias")
    if class_names:
        return f"only the classes {', '.join(class_names)} ({other})"
    if recorded == []:
        return ("unlabelled slices: the model draws from the training folder's mix of diagnoses, whatever it held, "
                "and cannot be asked for one")
    if recorded and len(recorded) == 1:
        return f"only {recorded[0]} slices, the training folder's one class ({other})"
    if recorded:
        return f"only the classes of the training folder, {', '.join(recorded)}, mixed: it takes no label ({other})"
    return f"only the classes of the training folder ({other})"


def _demo_data_command(training_data: dict) -> str | None:
    """The `demo-data` command that rebuilds a demo-set model's data byte for byte (its build's flags, recorded in
    training_data.json since 2026-12-07); None where the record does not hold all of them."""
    build = training_data.get("demo_data")
    flags = ("subjects", "slices_per_subject", "test_fraction", "seed")
    if not isinstance(build, dict) or not all(_is_number(build.get(k)) for k in flags):
        return None
    return (f"adni-diffusers demo-data AD_NC --subjects {build['subjects']:g} --slices-per-subject "
            f"{build['slices_per_subject']:g} --test-fraction {build['test_fraction']:g} --seed {build['seed']:g}")


def pipeline_card_context(model_dir, repo_id: str | None = None, data_source: str | None = None,
                          sample_grid: str | None = None) -> dict:
    """Everything `pipeline_card.md` uses, read from a saved pipeline folder."""
    from .hub import first_stage_sources

    d = Path(model_dir)
    index = read_json_object(d / "model_index.json")
    data = read_json_object(d / "training_data.json")
    args = read_json_object(d / "training_args.json")
    train = read_json_object(d / "train_metrics.json")
    unet = read_json_object(d / "unet" / "config.json")
    vq = read_json_object(d / "vqvae" / "config.json")
    sched = read_json_object(d / "scheduler" / "scheduler_config.json")
    source = _data_source(d, data_source)
    own_source = _own_data_source(d, data_source)  # the UNet's: what the data section describes
    class_names = _class_names(index.get("class_names"))
    conditional = bool(unet.get("num_class_embeds")) and bool(class_names)
    repo, placeholder = _repo_id(d, args, repo_id)
    eval_rows, eval_source, eval_settings = _evaluation(d)
    # copied by train_unet.py; never read from the first stage's folder, which may have trained again since (and
    # is not there where the card is rendered for a push on another machine)
    vq_metrics = read_json_object(d / "first_stage_metrics.json")
    vq_args = read_json_object(d / "first_stage_training_args.json")  # likewise (pipelines since 2026-12-05)
    channels = unet.get("block_out_channels") or []
    # UNet2DModel's middle block has self-attention unless it is switched off (add_attention) or absent
    mid_attention = (unet.get("mid_block_type", "UNetMidBlock2D") is not None) and unet.get("add_attention", True)
    grid = sample_grid or "samples.png"
    class_name = index.get("_class_name")  # [module, class]: the module is named with a hash of its text
    module = class_name[0] if isinstance(class_name, list) and class_name and class_name[0] else "pipeline_adni_ldm"
    min_diffusers, version_checked = shipped_file_diffusers(d, f"{module}.py")
    exported = read_json_object(d / "exported_from.json")  # `adni-diffusers export`: a checkpoint's weights
    exported_text = None
    if isinstance(exported.get("step"), int):
        total = args.get("max_train_steps")
        exported_text = (f"These weights are step {exported['step']}"
                         + (f" of the run's {total}" if isinstance(total, int) else "")
                         + f" (its `checkpoint-{exported['step']}`"
                         + (", the EMA's weights" if exported.get("weights") == "EMA" else "")
                         + "), saved as a pipeline by `adni-diffusers export`: the run's arguments below describe "
                           "the whole run, not these weights alone.")
    ctx = {
        "slice_size": shipped_file_gives_slice_size(d, f"{module}.py") and (
            "(256, 240)" if (index.get("preprocess") or "pad") == "pad" else "(182, 218)"),
        "slice_size_of": ("ADNI's 256 x 240 slices" if (index.get("preprocess") or "pad") == "pad"
                          else "182 x 218 registered slices"),
        "exported_text": exported_text,
        "model_name": repo.split("/")[-1],
        "pipeline_file": f"{module}.py",
        "min_diffusers": min_diffusers,
        "version_checked": version_checked,
        "repo_id": repo,
        "repo_id_is_placeholder": placeholder,
        "data_source": source,
        "unet_data_source": own_source,
        "demo_data_command": _demo_data_command(data) if own_source == "demo" else None,
        # a copy saved from a loaded pipeline has no training records, but keeps a demo model's LICENSE.md
        "mni_notice_file": _holds_mni_notice(d / LICENSE_FILE),
        "first_stage_text": _first_stage_text(data, own_source, source, first_stage_sources(d)),
        "class_names": class_names,
        "conditional": conditional,
        # --cond_dropout 0 never trains the "no label" class guidance needs (train_unet warns, samples.png is unguided);
        # a record without the flag (older, or a copy of a loaded pipeline) keeps the guided wording
        "guided": conditional and not (_is_number(args.get("cond_dropout")) and args["cond_dropout"] == 0),
        "example_label": class_names[0] if conditional else None,
        # the snippets' literals: a name with a space or a quote is one shell word and one Python string
        "example_label_python": _python_string(class_names[0]) if conditional else None,
        "example_label_shell": shlex.quote(class_names[0]) if conditional else None,
        "class_literals": [_python_string(name) for name in class_names or []],
        "data_layout": _data_layout(data, class_names),
        "scope_text": _scope_text(data, class_names),
        "unet_params": _millions(_count_parameters(d / "unet")),
        "unet_channels": ", ".join(str(c) for c in channels) or "?",
        "unet_layers": _count(unet.get("layers_per_block", "?"), "layer"),
        "unet_attention": _attention_text(list(unet.get("down_block_types") or []), unet.get("sample_size"),
                                          mid_attention),
        "unet_sample_size": unet.get("sample_size", "?"),
        "latent_channels": unet.get("in_channels", vq.get("latent_channels", "?")),
        "vq_params": _millions(_count_parameters(d / "vqvae")),
        "vq_codes": vq.get("num_vq_embeddings", "?"),
        "vq_scaling_factor": _fmt(vq.get("scaling_factor")),
        "scheduler_class": (index.get("scheduler") or [None, sched.get("_class_name", "?")])[1],
        "num_train_timesteps": sched.get("num_train_timesteps", "?"),
        # the snippet's full DDPM chain: one step per training timestep (1000 where the config does not say)
        "ddpm_steps": sched.get("num_train_timesteps") if isinstance(sched.get("num_train_timesteps"), int) else 1000,
        "beta_text": _beta_text(sched),
        "prediction_type": sched.get("prediction_type", "epsilon"),
        "arg_rows": _argument_rows(args, _field(train, "train_steps", int)),
        "session_lines": _session_lines(args),
        "environment_text": _environment_text(args),
        "train_steps": _field(train, "train_steps", int),
        "num_processes": _count(train["num_processes"], "process", "processes")
        if isinstance(train.get("num_processes"), int) else None,
        # none where the run trained no step (finished from its last checkpoint): not "0 images/s"
        "images_per_second": _fmt(rate) if (rate := train.get("train_images_per_second_this_run")) else None,
        # a resumed run's rate covers only its last process's steps (older records do not say how many)
        "session_steps": session if (session := _field(train, "train_steps_this_run", int)) is not None
        and isinstance(train.get("train_steps"), int) and session < train["train_steps"] else None,
        # the median between logs: without the compilation, checkpoints and sample grids the whole-run rate holds
        "steady_images_per_second": _fmt(steady) if (steady := _field(train, "train_images_per_second_steady",
                                                                      (int, float))) else None,
        "val_loss": _fmt(train.get("val_loss")) if train.get("val_loss") is not None else None,
        "ema_text": _ema_text(args, train.get("ema_decay_reached")),
        "eval_rows": eval_rows,
        "eval_source": eval_source,
        "eval_settings": eval_settings,
        "eval_report": "evaluation/report.md" if (d / "evaluation" / "report.md").is_file() else None,
        "eval_report_contents": _report_contents(d),
        "eval_has_floors": any(", floor:" in name for name, _ in eval_rows),
        "eval_one_patient_note": _one_patient_note(read_json_object(d / eval_source)) if eval_source else None,
        "eval_data_caveats": [f"{c[0].upper()}{c[1:]}." for c in
                              held_out_caveats(_field(read_json_object(d / eval_source), "data") or {})]
        if eval_source else [],
        "val_set_text": _val_set_text(data, args, own_source),
        "vq_rows": _vq_rows(vq_metrics),
        "vq_eval_set": vq_metrics.get("eval_set"),
        "vq_arg_rows": _argument_rows(vq_args, _field(vq_metrics, "train_steps", int)),
        "vq_environment_text": _environment_text(vq_args),
        "sample_grid": grid if (d / grid).is_file() else None,
        "sample_steps": args.get("sample_inference_steps"),
        # recorded since 2026-12-05; the grids were sampled without guidance before
        "sample_guidance": _fmt(g) if isinstance(g := args.get("sample_guidance"), (int, float)) and g != 1 else None,
        "seed": args.get("seed", 0),
        "sample_remake": _sample_remake_command(train, args, conditional),
        "loss_curve": "loss_curve.png" if (d / "loss_curve.png").is_file() else None,
        "files": _files_listing(d),
        "mni_notice": MNI_NOTICE,
        "adni_acknowledgement": ADNI_ACKNOWLEDGEMENT,
    }
    ctx.update(_data_context(data, args, own_source))
    return ctx


def _beta_text(sched: dict) -> str:
    schedule = sched.get("beta_schedule", "?")
    if schedule == "squaredcos_cap_v2":  # diffusers ignores beta_start / beta_end for it
        return "cosine betas (`squaredcos_cap_v2`, Nichol & Dhariwal 2021)"
    return f"{schedule} betas from {_fmt(sched.get('beta_start'))} to {_fmt(sched.get('beta_end'))}"


def _patient_rule(data: dict, args: dict, source: str) -> str:
    """The patient rule the split was drawn by, as the card words its caveats: the demo set's names (123138_85)
    hold one subject each and no ADNI id, so every rule split them alike (a demo model from before 2026-12-03 was
    carded with the LONI caveat, "one subject's visits may be on both sides": a helper's audit, 2026-12-06)."""
    if source == "demo":
        return "subject"
    from .data import recorded_patient_ids  # here: it imports torch

    return recorded_patient_ids(data, args)


def _val_set_text(data: dict, args: dict, source: str) -> str:
    """What val_loss (train_unet.py) was measured on, in the split's own words."""
    split = data.get("split") or args.get("split")
    if split == "given":
        return "the given test folder's latents" + (" (some of its patients are also in training)"
                                                   if data.get("shared_patients") else "")
    rule = _patient_rule(data, args, source) if split == "patient" else "subject"
    if rule == "file":
        return "held-out scans' latents (a subject's other visits may be in training)"
    if rule == "subject-2026-12-03":
        return "held-out patients' latents (a subject named two ways may also be in training)"
    return "held-out patients' latents"


def _report_contents(model_dir: Path) -> str:
    """What evaluation/report.md holds besides the numbers, from its metrics.json (ablations and the UMAP are
    optional, per-class tables come with class-conditional models)."""
    metrics = read_json_object(model_dir / "evaluation" / "metrics.json")
    parts = ["each number beside its floor"]
    if (_field(metrics, "model") or {}).get("conditional"):
        parts.append("per-class tables")
    if metrics.get("ablations"):  # run, not only asked for (an evaluation cut short in them has none)
        parts.append("ablations")
    if (_field(metrics, "files") or {}).get("umap"):
        parts.append("the UMAP")
    parts.append("the memorisation check")
    text = in_words(parts)
    if metrics.get("complete") is False:
        text += " (an evaluation cut short before its UMAP and ablations)"
    return text


def _pipeline_tags(ctx: dict) -> list[str]:
    tags = BASE_TAGS + ["latent-diffusion"]
    tags += ["class-conditional", "image-generation"] if ctx["conditional"] else []
    tags += ["adni"] if ctx["data_source"] == "user" else ["synthetic-data"] if ctx["data_source"] == "demo" else []
    return tags + [PACKAGE_TAG]


def _revision_context(revision: str | None) -> dict:
    """A card pushed to a branch other than main: its snippets load that branch (main may hold an older model,
    or nothing)."""
    on_branch = bool(revision) and revision != "main"
    return {"revision": revision if on_branch else None,
            "revision_arg": f', revision="{revision}"' if on_branch else ""}


def _sample_remake_command(train: dict, args: dict, conditional: bool) -> str | None:
    """The flags after `generate --model` that remake samples.png (a row of it, with --class), where the run drew it
    with generate's per-image seeds (train_metrics.json says so since 2026-12-07; one generator a row before)."""
    steps, seed = args.get("sample_inference_steps"), args.get("seed", 0)
    if not train.get("samples_image_seed") or not isinstance(steps, int) or not isinstance(seed, int):
        return None
    guidance = args.get("sample_guidance")
    flags = f"--out samples --scheduler ddim --steps {steps} --seed {seed} --num-images 8"
    if conditional and _is_number(guidance):
        flags += f" --class <a row's class> --guidance {_fmt(guidance)}"
    return flags


def render_pipeline_card(model_dir, repo_id: str | None = None, data_source: str | None = None,
                         sample_grid: str | None = None, revision: str | None = None) -> str:
    from huggingface_hub import ModelCard

    ctx = pipeline_card_context(model_dir, repo_id, data_source, sample_grid) | _revision_context(revision)
    # the Hub has no class-conditional pipeline tag: a class-conditional model under unconditional-image-generation
    # is mislabelled, so it gets none and the free-form tags say what it is (what Hub staff do for such models)
    tag = {} if ctx["conditional"] else {"pipeline_tag": "unconditional-image-generation"}
    card_data = _card_data(ctx["data_source"], model_dir, tags=[], **tag)
    card = ModelCard.from_template(card_data, template_path=str(TEMPLATE), **ctx)
    return _finish(_populate(card, _pipeline_tags(ctx)))


def _finish(card) -> str:
    text = str(card)
    text = re.sub(r"\n{3,}", "\n\n", text)  # Jinja blocks leave blank runs
    return text.rstrip() + "\n"


# ----------------------------------------------------------------------------- first-stage card
VQ_CARD_TEMPLATE = """---
{{ card_data }}
---
<!-- adni-diffusers model card: generated from the files beside it; `adni-diffusers push` and write_model_card() rewrite it. Delete this line to keep hand edits. -->

# {{ model_name }}

The first stage of an adni-diffusers latent diffusion model: a VQ-regularised autoencoder
(diffusers `VQModel`, {{ vq_params }} parameters) that turns a greyscale 256 x 256 brain MRI slice into a
{{ latent_channels }} x {{ latent_size }} x {{ latent_size }} latent and back, through a codebook of {{ vq_codes }} entries. It was trained on
{{ data_summary }}. A diffusion UNet (`train_unet.py --vqmodel`) is trained on its latents.

{% if data_source == "demo" -%}
> **Demo model**: trained on a small synthetic stand-in for ADNI built from one template brain, to show the
> workflow; its reconstructions say little about real scans.

{% endif -%}
> **Research use only.** Not a medical device; not for diagnosis or any clinical decision.

{% if reconstructions -%}
![{{ recon_set[:1] | upper }}{{ recon_set[1:] }} (top), their reconstructions (middle) and the absolute error x 10 (bottom)]({{ reconstructions }})

*Top: {{ recon_set }}; middle: reconstructions; bottom: absolute error x 10 (black = exact, white = 10% of the
intensity range or more).*
{% else -%}
The reconstruction grid (`reconstructions.png` in the training output folder) shows real slices, so it is not
part of this card or its repo.
{% endif %}

## Reconstruction quality

{% if vq_rows -%}
Measured on {{ vq_eval_set or "held-out slices" }}:

| metric | value |
|---|---|
{% for label, value in vq_rows -%}
| {{ label }} | {{ value }} |
{% endfor -%}
{% else -%}
Not measured (no `metrics.json` in this folder).
{% endif %}
`scaling_factor` = {{ vq_scaling_factor }} (1 / standard deviation of the training latents, computed from the data):
the diffusion model works on `latents * scaling_factor`.

## Training data

{{ data_description }}

| split | images | patients | per class |
|---|---|---|---|
{% for split, images, patients, per_class in data_rows -%}
| {{ split }} | {{ images }} | {{ patients }} | {{ per_class }} |
{% endfor %}
- Split: {{ split_text }}.
- Preprocessing: {{ preprocess_text }}; intensities scaled to [-1, 1].

## Training

| argument | value | meaning |
|---|---|---|
{% for name, value, label in arg_rows -%}
| {{ name }} | {{ value }} | {{ label }} |
{% endfor %}
{% if ema_text %}{{ ema_text }}

{% endif %}{% for line in session_lines %}{{ line }}

{% endfor %}{% if environment_text %}Trained with {{ environment_text }}.
{% endif %}The full list is in `training_args.json`.
{% if loss_curve %}
![Training losses]({{ loss_curve }})
{% endif %}

## Use

```python
import torch
from diffusers import VQModel

vq = VQModel.from_pretrained("{{ repo_id }}", subfolder="vqvae"{{ revision_arg }})
x = torch.zeros(1, 1, 256, 256)                       # a slice scaled to [-1, 1]
h = vq.encode(x).latents                              # pre-quantisation latents, {{ latent_channels }} x {{ latent_size }} x {{ latent_size }}
recon = vq.decode(h).sample                           # quantised and decoded
```
{% if repo_id_is_placeholder %}
Replace `{{ repo_id }}` with the repo this model is pushed to, or with the local folder.
{% endif %}

## Limitations

- Trained for one thing: axial slices like those of its training folder (position, contrast, 256 x 256).
- Reconstructions smooth fine detail; they are not diagnostic images.
- {{ license_text }}
"""


def vq_card_context(model_dir, repo_id: str | None = None, data_source: str | None = None) -> dict:
    d = Path(model_dir)
    data = read_json_object(d / "training_data.json")
    args = read_json_object(d / "training_args.json")
    metrics = read_json_object(d / "metrics.json")
    vq = read_json_object(d / "vqvae" / "config.json")
    source = _data_source(d, data_source)
    repo, placeholder = _repo_id(d, args, repo_id)
    ctx = {
        "model_name": repo.split("/")[-1],
        "repo_id": repo,
        "repo_id_is_placeholder": placeholder,
        "data_source": source,
        "vq_params": _millions(_count_parameters(d / "vqvae")),
        "vq_codes": vq.get("num_vq_embeddings", "?"),
        # the quantiser's width where it differs from the encoder's (vq_embed_dim): what encode().latents has
        "latent_channels": vq.get("vq_embed_dim") or vq.get("latent_channels", "?"),
        "latent_size": _latent_size(vq),
        "vq_scaling_factor": _fmt(vq.get("scaling_factor")),
        "vq_rows": _vq_rows(metrics),
        "vq_eval_set": metrics.get("eval_set"),
        # the grid shows the first slices of the set the metrics measured (vq_eval.evaluate_and_save)
        "recon_set": ("training slices (nothing was held out)"
                      if str(metrics.get("eval_set", "")).startswith("training images") else "held-out slices"),
        # real slices: shown only for demo models (a push of any other leaves the picture out, hub.py)
        "reconstructions": "reconstructions.png" if (d / "reconstructions.png").is_file() and source == "demo"
        else None,
        "loss_curve": "loss_curve.png" if (d / "loss_curve.png").is_file() else None,
        "arg_rows": _argument_rows(args, _field(metrics, "train_steps", int)),
        "ema_text": _ema_text(args, metrics.get("ema_decay_reached"), "VQModel",
                              "the reconstruction numbers and grid"),
        "session_lines": _session_lines(args),
        "environment_text": _environment_text(args),
    }
    ctx.update(_data_context(data, args, source))
    if source == "demo":
        ctx["data_description"] = (
            f"The synthetic demo set (`{_demo_data_command(data) or 'adni-diffusers demo-data'}`): the MNI152 2009 "
            "template bundled with nilearn, seen through random deformations, with simulated atrophy for the \"AD\" "
            "class. No patient data.")
        ctx["license_text"] = ("`license: other`: the training images derive from the MNI ICBM152 2009 template, "
                               "whose notice must be kept: " + MNI_NOTICE)
    else:
        ctx["data_description"] = (
            f"Slices from an ADNI-style folder (`{ctx['data_root_name']}`), supplied by whoever trained the model. "
            "The images are not in this repository.")
        ctx["license_text"] = ("`license: other`: a model of ADNI data is a derivative of data under the ADNI Data "
                               "Use Agreement, which forbids redistributing the data; autoencoders reproduce their "
                               "inputs closely. Share it only as far as your agreement allows.")
    return ctx


def render_vq_card(model_dir, repo_id: str | None = None, data_source: str | None = None,
                   revision: str | None = None) -> str:
    from huggingface_hub import ModelCard

    ctx = vq_card_context(model_dir, repo_id, data_source) | _revision_context(revision)
    tags = BASE_TAGS + ["vq-vae", "autoencoder"]
    tags += ["adni"] if ctx["data_source"] == "user" else ["synthetic-data"] if ctx["data_source"] == "demo" else []
    card = ModelCard.from_template(_card_data(ctx["data_source"], model_dir, tags=[]), template_str=VQ_CARD_TEMPLATE, **ctx)
    return _finish(_populate(card, tags + [PACKAGE_TAG]))


# ----------------------------------------------------------------------------- entry points
def model_kind(model_dir) -> str | None:
    """"pipeline" (model_index.json), "vqmodel" (vqvae/config.json, no index) or None."""
    d = Path(model_dir)
    if (d / "model_index.json").is_file():
        return "pipeline"
    if (d / "vqvae" / "config.json").is_file():
        return "vqmodel"
    return None


def render_model_card(model_dir, repo_id: str | None = None, data_source: str | None = None,
                      sample_grid: str | None = None, revision: str | None = None) -> str:
    """The card (README.md text) of a saved pipeline or VQ folder, from the files in it.

    `repo_id`: the repo the code snippets load from (default: `hub_model_id` in training_args.json, else
    a `your-user/<folder name>` placeholder); `revision`: the branch they load, where not main. Call again
    after evaluation to add the numbers.
    """
    kind = model_kind(model_dir)
    if kind == "pipeline":
        return render_pipeline_card(model_dir, repo_id, data_source, sample_grid, revision)
    if kind == "vqmodel":
        return render_vq_card(model_dir, repo_id, data_source, revision)
    raise ValueError(f"{model_dir}: neither a saved pipeline (model_index.json) nor a VQ model folder (vqvae/)")


def is_generated_card(text: str) -> bool:
    """Whether a README.md was written by this module (and may be re-rendered)."""
    return CARD_MARKER in text


def write_model_card(output_dir, pipe=None, args=None, data_source: str | None = None, sample_grid=None) -> Path:
    """Render the card of the model saved in `output_dir` and write `output_dir/README.md`.

    Called at the end of train_unet.py (and train_vqmodel.py, with `pipe=None`). `pipe` is not needed
    (everything is read from the saved files); `args` gives the repo id (--hub_model_id). A README.md without
    the marker line is the user's own: left as it is.
    """
    output_dir = Path(output_dir)
    path = output_dir / CARD_FILE
    if path.is_file() and not is_generated_card(path.read_text(encoding="utf-8", errors="replace")):
        logger.warning("%s has no adni-diffusers marker line: it is your own card, left as it is (delete it to "
                       "get a generated one)", path)
        return path
    if _own_data_source(output_dir, data_source) == "demo":  # the UNet's images: their notice goes with copies,
        write_demo_license(output_dir)  # whatever the first stage learned from
    else:
        remove_demo_license(output_dir)
    repo_id = getattr(args, "hub_model_id", None) if args is not None else None
    text = render_model_card(output_dir, repo_id=repo_id, data_source=data_source,
                             sample_grid=Path(sample_grid).name if sample_grid else None)
    path.write_text(text, encoding="utf-8")
    return path
