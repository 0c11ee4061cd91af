"""What both training scripts share: flags, Accelerate set-up, data, the step loop's bookkeeping,
atomic checkpoints with exact resume, EMA, NaN guard, logs and pictures.

The scripts (`train_vqmodel.py`, `train_unet.py`) keep only their stage's model and loss. Here:

- `add_training_arguments`: the flags every diffusers training example has, named the same way.
- `setup`: an `Accelerator`, the world-size guard, seeds, the output-folder check.
- `TrainingRun`: epochs, resume, progress bar, logging, checkpoints, EMA, the NaN guard and a checkpoint on
  SIGTERM / SIGUSR1 (a cluster's time limit) around a loop the script writes itself.

Resuming is exact: each epoch's data order is a pure function of (seed, epoch), and every random
draw of a step comes from `run.step_generator()`, a pure function of (seed, step, process).
Nothing depends on how many times the global RNG was used before a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .compile_probe import CUDA_GRAPH_MODES
from .progress import console_logs_above_progress_bars, on_a_terminal
from .files import (fsync_tree, not_a_folder, read_as_data, read_json_object, remove_path, replace_folder,
                    write_text_atomically, writing)

logger = logging.getLogger("adni_diffusers.training")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
HISTORY_FILE = "logs/history.jsonl"
DEFAULT_VAL_FRACTION = 0.1
WORKERS_PER_CPU = 4  # --dataloader_num_workers above this many per CPU is refused: a typo, not a setting
# on the CPU, the pace of the steps after the first (which may compile) gives the run's length; a longer one is
# said once: the defaults train `base` for hours there, which a user trying the commands does not expect
CPU_PACE_STEPS = 3
LONG_CPU_RUN_S = 3600.0
# loss_curve.png at a checkpoint: at most this often, counted from the run's start (a 12-panel curve took 1-2 s on a
# CPU, 2026-12-07; a test checkpoints every step)
LOSS_CURVE_EVERY_S = 60.0
# where stderr is not a terminal (a SLURM .out), a log line of the step, loss, lr and pace at most this often
PLAIN_LOG_SECONDS = 30.0
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")  # their rate after warm-up does not depend on the length


class TrainingError(RuntimeError):
    """A problem with the flags, the data or the run, stated so a user can act on it.

    `every_process`: True where every process of a multi-process run raises the same error at once (a bad flag,
    the data folder, the output folder, a non-finite loss agreed by all-reduce): the main process alone prints it.
    False for what one process may meet alone (its own write check), None where not known: those print anywhere."""

    every_process: bool | None = None


@contextlib.contextmanager
def alike_on_every_process():
    """Marks the TrainingErrors raised inside as raised the same on every process (`TrainingError.every_process`),
    unless the error says otherwise: checks of the flags and of folders every process reads alike."""
    try:
        yield
    except TrainingError as e:
        if e.every_process is None:
            e.every_process = True
        raise


def _rank() -> int:
    """This process's rank under a launcher (torchrun, `accelerate launch`); 0 alone. RANK without WORLD_SIZE > 1
    (left in the environment by a job script, with `python train_*.py` run on its own) is no group: Accelerate
    makes such a process its main one, and it must say its own errors (it took itself for process 1: argparse's
    error went nowhere, a TrainingError waited 30 s for a main process there was none of)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


# what a scheduler sends before it kills a job (SLURM: SIGTERM at the time limit, `--signal=USR1@120` earlier)
# the same stop signal twice within this is one request: torchrun's agent forwards the SIGTERM a scheduler sent
# every process of the job, so each worker gets it twice (the agent's SIGKILL follows 30 s later)
REPEATED_SIGNAL_S = 2.0
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class TrainingStopped(Exception):
    """A stop signal reached a process: every process agreed on a step, checkpointed it and stopped."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name if signum else "a stop signal (on another process)"
        super().__init__(f"stopped by {name} at step {step}; {checkpoint} is written: go on from it with "
                         "--resume_from_checkpoint latest")


_noted_stop_signal: int | None = None  # the last stop signal a run noted, and finished its final phase despite


def take_noted_stop_signal() -> int | None:
    """The stop signal a finished run let its final save complete despite (None if none), forgotten once read.
    The demo trains both stages in one process: a signal that came while the first one finished must stop it
    before the second (it started the second stage, and the job was killed in it)."""
    global _noted_stop_signal
    signum, _noted_stop_signal = _noted_stop_signal, None
    return signum


def _ignore_stop_signals(worker_id: int) -> None:
    """Data workers get a scheduler's SIGTERM too (it signals every process of the job): they would die, and the
    main process's next batch fail before it could checkpoint. It stops them itself."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


# ------------------------------------------------------------------------------------------- flags


EMA_DEFAULTS = {"ema_max_decay": 0.9999, "ema_inv_gamma": 1.0, "ema_power": 3 / 4}


def add_training_arguments(parser: argparse.ArgumentParser, *, default_lr: float, default_batch: int) -> None:
    """Flags named as in diffusers' training examples."""
    g = parser.add_argument_group("data")
    g.add_argument("--train_data_dir", default=None,
                   help="ADNI-style folder ROOT/{train,test}/{AD,NC}/*.jpeg; default: build and use the demo set "
                        "(train_unet.py: the folder its --vqmodel was trained on, where that was not the demo set "
                        "built for want of this flag)")
    g.add_argument("--demo_data_dir", default="adni_demo_data",
                   help="where the demo set is built when --train_data_dir is not given")
    g.add_argument("--split", default="patient", choices=["patient", "given", "all"],
                   help="patient: hold out whole patients (default); given: the folders' train/test; all: no hold-out")
    g.add_argument("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="share of patients held out with --split patient")
    g.add_argument("--split_seed", type=int, default=None,
                   help="seed of the held-out patient draw (--split patient); default: --seed. Give the VQModel's "
                        "to train UNets with other --seed values on one VQModel")
    g.add_argument("--preprocess", default="pad", choices=["pad", "resize", "fit"],
                   help="240->256 rows: pad with black (keeps anatomy) or resize (the seed's stretch; any size); "
                        "fit: any size scaled to 256 on its longer side, proportions kept, and padded with black "
                        "(registered slices such as 182x218)")
    g.add_argument("--patient_ids", default="subject", choices=["subject", "file", "subject-2026-12-03"],
                   help="subject: an ADNI (002_S_0295, 035_S_10068) or BIDS (sub-...) subject id in a file name is "
                        "the patient (sub-ADNI002S0295 is 002_S_0295 where both name slices), and a slice copied into "
                        "train/ and test/ counts once; file: the name's patient part as it is, copies kept (how runs "
                        "from before 2026-12-03 split); subject-2026-12-03: subject as it was before 2026-12-04 (a "
                        "subject named both ways counted twice, five-digit ids not read) (the last two: to resume or "
                        "match such a run)")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="worker processes per training process feeding the batches (0: the training process)")

    g = parser.add_argument_group("output")
    g.add_argument("--output_dir", required=True,
                   help="where the model, its checkpoints (checkpoint-<step>/), logs, samples and card go")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="replace a model already in --output_dir")
    g.add_argument("--logging_dir", default="logs",
                   help="tensorboard folder, relative to --output_dir (an absolute folder elsewhere is kept as is; "
                        "--output_dir itself or a folder above it is refused)")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none"],
                   help="tensorboard: losses, learning rate and sample grids under --logging_dir")
    g.add_argument("--logging_steps", type=int, default=10,
                   help="log (and check the loss for NaN/inf, and whether a SIGTERM/SIGUSR1 came to any process: "
                        "then checkpoint and stop; one process alone stops at its next step) every N optimizer steps")
    g.add_argument("--validation_steps", type=int, default=500,
                   help="the held-out numbers (train_unet: the denoising loss; train_vqmodel: PSNR and SSIM) of the "
                        "weights a save would keep (the EMA's with --use_ema) every N optimizer steps and at the "
                        "last: into tensorboard, logs/history.jsonl and loss_curve.png (0: only at the end)")
    g.add_argument("--trace_batches", action="store_true",
                   help="debug data parallelism: each process writes its batch indices and a weight checksum "
                        "per step to <output_dir>/trace/rank-<i>.jsonl")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--seed", type=int, default=0,
                   help="the initial weights, the data order, each step's noise and the held-out draw (--split_seed)")
    g.add_argument("--train_batch_size", type=int, default=default_batch, help="per device")
    g.add_argument("--eval_batch_size", type=int, default=16,
                   help="batch for encoding, evaluation and sample grids (no gradients)")
    g.add_argument("--num_epochs", type=int, default=10, help="passes over the training slices")
    g.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_epochs")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=default_lr, help="AdamW's peak learning rate")
    g.add_argument("--scale_lr", nargs="?", const="linear", default=False, choices=["linear", "sqrt"],
                   help="scale the learning rate (and the VQ discriminator's) with the effective batch (processes "
                        "x batch size x accumulation) over the default batch: linear (the flag alone, as in "
                        "diffusers' examples) or sqrt (the square root of that ratio, the gentler rule often used "
                        "with Adam)")
    g.add_argument("--lr_scheduler", default="cosine",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
                   help="diffusers' get_scheduler schedule over the run's steps, after --lr_warmup_steps")
    g.add_argument("--lr_warmup_steps", type=int, default=100, help="optimizer steps of linear warm-up from 0")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW's beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW's beta2")
    g.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW's weight decay")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW's epsilon")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient's norm to this")
    g.add_argument("--use_ema", action="store_true", help="keep an exponential moving average of the weights")
    for name, default in EMA_DEFAULTS.items():
        g.add_argument(f"--{name}", type=float, default=default, help="diffusers' EMAModel setting (with --use_ema)")

    g = parser.add_argument_group("speed")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: what `accelerate config` says")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--channels_last", action="store_true", help="channels-last memory format (faster convs on GPU)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model; falls back to eager if a compiled training step fails "
                        "(on CUDA tried first in a child process)")
    g.add_argument("--compile_mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode with --compile; reduce-overhead uses CUDA graphs (default: reduce-overhead "
                        "for train_unet.py on one CUDA process without --gradient_accumulation_steps, torch's "
                        "default otherwise)")
    g.add_argument("--cudnn_benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms for these fixed shapes (CUDA; not bit-reproducible)")
    g.add_argument("--ddp_timeout", type=int, default=1800,
                   help="seconds a process waits at a barrier (as in transformers' Trainer): the other processes wait "
                        "while the main one builds the latent cache, evaluates, samples and pushes (default: 1800; "
                        "NCCL's own, 10 minutes, would end the job during a long push)")

    g = parser.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="save a resumable checkpoint-<step>/ every N optimizer steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="keep only the newest N checkpoints (default: keep all)")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help='"latest" or the path of a checkpoint-<step> folder (a name alone: in --output_dir, where '
                        'not in the current folder)')


def validate_training_arguments(args: argparse.Namespace) -> None:
    from .files import expand_home

    expand_home(args)  # --output_dir=~/runs/vq: the shell leaves "~" after "=" as it is
    require_at_least(args, 1, "train_batch_size", "eval_batch_size", "num_epochs", "max_train_steps",
                     "gradient_accumulation_steps", "checkpointing_steps", "checkpoints_total_limit", "logging_steps",
                     "ddp_timeout")
    require_at_least(args, 0, "lr_warmup_steps", "dataloader_num_workers", "adam_weight_decay", "validation_steps")
    from .data import usable_cpus

    cpus = usable_cpus()
    if args.dataloader_num_workers > WORKERS_PER_CPU * cpus:  # each worker is a process: thousands hung the start
        raise TrainingError(f"--dataloader_num_workers {args.dataloader_num_workers}: more than {WORKERS_PER_CPU} "
                            f"worker processes per CPU this process may use ({cpus}); give at most "
                            f"{WORKERS_PER_CPU * cpus} (torch suggests at most {cpus})")
    require_positive(args, "learning_rate", "adam_epsilon", "max_grad_norm", "ema_inv_gamma", "ema_power")
    require_fraction(args, "adam_beta1", "adam_beta2", below_one=True)
    require_fraction(args, "ema_max_decay")
    if not 0.0 < args.val_fraction < 1.0:
        raise TrainingError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.split != "patient":  # they draw the held-out patients, which only --split patient does
        ignored = [f"--{name} {getattr(args, name)}" for name, default in (("val_fraction", DEFAULT_VAL_FRACTION),
                                                                             ("split_seed", None))
                   if getattr(args, name) != default]
        if ignored:
            raise TrainingError(f"{' and '.join(ignored)} only apply to --split patient (this run: --split "
                                f"{args.split}); leave them out")
    if not args.use_ema:  # they shape the EMA only: without --use_ema they did nothing, without a word
        ignored = [f"--{name} {getattr(args, name):g}" for name, default in EMA_DEFAULTS.items()
                   if getattr(args, name) != default]
        if ignored:
            raise TrainingError(f"{' and '.join(ignored)} only apply with --use_ema; add it or leave them out")
    for name in ("seed", "split_seed"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value < 2**32:
            raise TrainingError(f"--{name} must be between 0 and 2**32 - 1, got {value}")
    # torch's process group keeps the timeout in nanoseconds: more overflowed (a traceback before any other check)
    require_at_most(args, 2**31 - 1, "ddp_timeout")
    for name in ("train_data_dir", "demo_data_dir", "output_dir"):
        if getattr(args, name) == "":  # an unset shell variable: "" is the current folder (the run trained there)
            raise TrainingError(f"--{name} is empty; expected a folder")
    if getattr(args, "train_data_dir", None):  # (the demo set's, or a VQModel's folder: when the stage starts)
        check_output_outside_data(args)
    logs = logging_folder(args)
    for name, folder in (("output_dir", Path(args.output_dir)), ("logging_dir", logs)):
        # mkdir's or tensorboard's NotADirectoryError came as a traceback (tensorboard's before the data was checked)
        if why := not_a_folder(folder):
            raise TrainingError(f"--{name} {getattr(args, name)}: {why}")
    if Path(args.output_dir).resolve().is_relative_to(logs):
        # --overwrite_output_dir and a fresh start clear the logging folder: this one holds the output folder
        raise TrainingError(f"--logging_dir {args.logging_dir}: the tensorboard folder ({logs}) must not be "
                            "--output_dir or a folder above it; use a subfolder (default: logs) or a folder "
                            "elsewhere")
    mode = getattr(args, "compile_mode", None)
    if mode and not args.compile:
        raise TrainingError(f"--compile_mode {mode} needs --compile")
    if mode in CUDA_GRAPH_MODES and args.gradient_accumulation_steps > 1:
        # CUDA graphs reuse their output buffers at the next micro-batch, and autograd keeps a first
        # micro-batch's gradient in such a buffer: accumulation would silently add the wrong numbers
        raise TrainingError(f"--compile_mode {mode} (CUDA graphs) cannot be combined with "
                            f"--gradient_accumulation_steps {args.gradient_accumulation_steps}; use "
                            "--compile_mode default or max-autotune-no-cudagraphs, or a larger --train_batch_size")
    if args.resume_from_checkpoint not in (None, "latest"):
        path = Path(args.resume_from_checkpoint)
        in_output_dir = Path(args.output_dir) / path
        if not path.is_dir() and not path.is_absolute() and in_output_dir.is_dir():
            # a checkpoint's name in --output_dir, as diffusers' training examples take it (`checkpoint-20`)
            path = in_output_dir
            args.resume_from_checkpoint = str(path)
        if not CHECKPOINT_RE.match(path.name) or not path.is_dir():
            raise TrainingError(
                f"--resume_from_checkpoint {path}: expected 'latest' or an existing checkpoint-<step> folder"
            )


# A flag out of range must stop the run here, not at its first use: a 0 interval divides by zero after an epoch,
# a negative weight trains the wrong way. `not value >= x` also catches NaN. None means "not given".


def logging_folder(args) -> Path:
    """--logging_dir: under --output_dir (an absolute path stays itself)."""
    return (Path(args.output_dir) / args.logging_dir).resolve()


def run_logging_folder(args) -> Path:
    """Where this run's tensorboard folder (<project>/) goes: --logging_dir where it is inside --output_dir; where it
    is elsewhere, in a subfolder that is --output_dir's path from the folder both are in (--output_dir sweep/lr1e-3
    and --logging_dir tb: tb/sweep/lr1e-3). A sweep gives its runs one --logging_dir, and each run wrote into the
    same <logging_dir>/unet/: TensorBoard showed the last one's curves, beside the first one's flags in the HParams
    table. (The output folder's name alone put exp1/unet and exp2/unet together.)"""
    logs, output_dir = logging_folder(args), Path(args.output_dir).resolve()
    if logs.is_relative_to(output_dir):
        return logs
    return logs / output_dir.relative_to(os.path.commonpath([logs, output_dir]))


def where_to_watch(args) -> str:
    """The run's pictures and logs for its last log line: the loss curve, the sample grids (where written) and the
    tensorboard folder (where it reports there). The summary named the model alone."""
    out = Path(args.output_dir)
    parts = [f"loss curve {out / 'loss_curve.png'}"]
    if (out / "samples").is_dir():
        parts.append(f"sample grids {out / 'samples'}")
    if getattr(args, "report_to", "none") == "tensorboard":
        parts.append(f"tensorboard --logdir {shlex.quote(str(run_logging_folder(args)))}")
    return "; ".join(parts)


# where inf means something (no clipping; a Min-SNR weight clamped nowhere): any other inf trained nothing or
# diverged without a word (--adam_epsilon inf made every update 0)
INFINITY_ALLOWED = ("max_grad_norm", "snr_gamma")


def _require_finite(name: str, value) -> None:
    if isinstance(value, float) and math.isinf(value) and name not in INFINITY_ALLOWED:
        raise TrainingError(f"--{name} must be a finite number, got {value}")


def require_at_least(args, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= minimum:
            raise TrainingError(f"--{name} must be at least {minimum}, got {value}")
        _require_finite(name, value)


def require_at_most(args, maximum: int, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value > maximum:
            raise TrainingError(f"--{name} must be at most {maximum}, got {value}")


def require_positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise TrainingError(f"--{name} must be positive, got {value}")
        _require_finite(name, value)


def require_fraction(args, *names: str, below_one: bool = False) -> None:
    """Values in [0, 1], or [0, 1) with `below_one`."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not (0 <= value < 1 if below_one else 0 <= value <= 1):
            bounds = "at least 0 and below 1" if below_one else "between 0 and 1"
            raise TrainingError(f"--{name} must be {bounds}, got {value}")


def check_hub_flags(args: argparse.Namespace) -> None:
    """--push_to_hub problems (bad repo id, no token) stop the run before training, not after it."""
    from .hub import HubError, check_hub_arguments

    try:
        check_hub_arguments(args)
    except HubError as e:
        raise TrainingError(str(e)) from None


# ------------------------------------------------------------------------------------------- setup


# how many copies srun or mpirun started (Slurm's own, Open MPI's, and PMI's, which srun --mpi=pmi2 sets too)
LAUNCHER_TASK_COUNTS = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


DATA_PARALLEL_ONLY = (
    "Accelerate is set to {kind}: adni-diffusers trains with data parallel (DDP; its models fit one GPU). Run "
    "`accelerate config` and choose multi-GPU without FSDP or DeepSpeed, or pass --config_file, or launch with "
    "`accelerate launch --multi_gpu --num_processes N` (docs/multi_gpu.md)")


def check_distributed_type(accelerator) -> None:
    """Data parallel (DDP) or one process only. An `accelerate config` set to FSDP or DeepSpeed (common on
    clusters shared with language models) was accepted, and then: its checkpoints (pytorch_model_fsdp_0/, ...)
    could never be resumed here, the EMA averaged shards, and the sample grids and the saved model used the main
    process's shard alone."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                        DistributedType.MEGATRON_LM):
        kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
        raise TrainingError(DATA_PARALLEL_ONLY.format(kind=kind))


def check_world_size(accelerator) -> None:
    """Stop when the launcher asked for several processes but Accelerate sees one; warn where the launcher
    started one process of several asked for.

    `accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs starts two processes
    that each train on ALL the data (facts.md): a silent waste at best. On CPU, set
    ACCELERATE_USE_CPU=true; on GPUs, check `accelerate config`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise TrainingError(
            f"WORLD_SIZE={world} but Accelerate sees 1 process: each process would train alone on all the data. "
            "On CPU launch with ACCELERATE_USE_CPU=true (gloo); on GPUs check that CUDA sees the devices "
            "(`accelerate env`)."
        )
    # `srun -n 4 python train_unet.py` or `mpirun -np 4 python ...` (no `accelerate launch`): on GPUs Accelerate
    # reads none of their variables, so each copy was a run of its own, on all the data, into the same folder
    copies = [f"{name}={os.environ[name]}" for name in LAUNCHER_TASK_COUNTS
              if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 1]
    if copies and "WORLD_SIZE" not in os.environ and accelerator.num_processes == 1:
        raise TrainingError(
            f"{copies[0]}: the launcher started several copies of this script, and each is a run of one process: "
            "every copy would train alone on all the data and write the same --output_dir. Start one `accelerate "
            "launch` per node, which starts one process per GPU (srun --ntasks-per-node=1 bash -c \"accelerate "
            "launch ...\", docs/slurm/train_unet.sbatch), or run one task (srun -n 1) for one process.")
    # `accelerate launch --cpu --num_processes 2`, a MULTI_CPU config (`accelerate config`'s CPU choice, with or
    # without use_cpu), or --num_processes 2 without --multi_gpu where CUDA sees no GPU: Accelerate's simple
    # launcher starts ONE process, with MASTER_ADDR set for the others it expects mpirun to start (it sets
    # ACCELERATE_USE_CPU "False" in the last two). The run is right, but not the one asked for. (The launcher
    # always sets ACCELERATE_MIXED_PRECISION: a MASTER_ADDR of the user's own in a plain run is not taken for it.)
    # (On a GPU the launcher starts them all; a MASTER_ADDR a cluster script set before a one-process launch is
    # passed on too: the CPU alone is told, as every case above runs there.)
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ
    if launched and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ and \
            accelerator.num_processes == 1 and accelerator.device.type == "cpu":
        # a MASTER_ADDR a job script exported is passed on too: where the launcher's own flags say how many
        # processes were asked for, one is nothing to tell of; a config's count is not on its command line
        asked = launcher_num_processes()
        if asked != 1:
            logger.warning("one process: %s its simple launcher starts a single process here (with --cpu, with a "
                           "MULTI_CPU config, or without --multi_gpu; it sets MASTER_ADDR for processes it leaves to "
                           "mpirun: a MULTI_CPU config's mpirun_config / --mpirun_hostfile). For N processes on the "
                           "CPU: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N "
                           "(docs/multi_gpu.md)", f"`accelerate launch` was asked for {asked}, but" if asked else
                           "if `accelerate launch` was asked for several (its --num_processes or the config's),")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 itself (x86's AVX512-BF16 or AMX); True where torch cannot say (ARM and
    others: no warning without a measurement)."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686") or not all(checks):
        return True
    return any(check() for check in checks)


def make_accelerator(args, project_name: str):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    output_dir = Path(args.output_dir)
    config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(run_logging_folder(args)))
    fresh_accelerate_state()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes"):
        # before Accelerator(), which without deepspeed installed says to install it, only for the run to be
        # refused by check_distributed_type once it is
        raise TrainingError(DATA_PARALLEL_ONLY.format(kind="DeepSpeed"))
    accelerator = Accelerator(
        # non_blocking: pinned batches are copied to the GPU without making the host wait each step. CUDA only:
        # on Apple's MPS a non-blocking copy from unpinned memory can read freed memory (pytorch issue 139550)
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=getattr(args, "ddp_timeout", 1800)))],
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=config,
    )
    check_world_size(accelerator)
    check_distributed_type(accelerator)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is too much
    if not accelerator.is_main_process:
        # the main process gives every warning once: under `accelerate launch` each one came N times, once per
        # process (what goes wrong in one process alone is an error, and still shows)
        logging.getLogger("adni_diffusers").setLevel(logging.ERROR)
    _quiet_libraries(accelerator.is_main_process)
    adopt_config_compile(accelerator, args)
    warn_if_the_accelerate_config_is_not_read(args)
    if accelerator.is_main_process:
        warn_about_launcher_flags_not_passed_on(accelerator)
    if precision_in_effect(accelerator) != accelerator.mixed_precision:
        # Accelerate has no fp16 autocast on the CPU and says nothing: the run would be float32 under an fp16 label
        given = "--mixed_precision fp16" if args.mixed_precision else "mixed precision fp16 (the accelerate config)"
        logger.warning("%s does nothing on the CPU: Accelerate trains in float32 there. "
                       "Use --mixed_precision no on a CPU (bf16 only where the CPU computes in bf16 itself: "
                       "AVX512-BF16 or AMX).", given)
    elif accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16" and not cpu_has_native_bf16():
        # bf16 autocast on a CPU without bf16 instructions converts every operand: 1.4 to 2.5x slower than float32
        # for the small and base models (a 2-core AVX512 Xeon without AVX512-BF16, 2026-12-07)
        given = "--mixed_precision bf16" if args.mixed_precision else "mixed precision bf16 (the accelerate config)"
        logger.warning("%s on this CPU, which has no bf16 instructions (AVX512-BF16 or AMX): "
                       "torch emulates bf16 there, which makes each training step slower than float32 (1.4 to 2.5x "
                       "measured); give --mixed_precision no on a CPU like this one", given)
    from accelerate.utils import set_seed

    set_seed(args.seed)  # the same initial weights on every process and in every run with this seed
    apply_backend_flags(args)
    return accelerator


def apply_backend_flags(args) -> None:
    """--allow_tf32 and --cudnn_benchmark: process-wide torch settings, which `keeps_session_logging` gives back
    after the run (torch_backend_settings)."""
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if getattr(args, "cudnn_benchmark", False) and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def fresh_accelerate_state() -> None:
    """Forget an earlier Accelerator of this process (a notebook's second run, the demo's second stage): Accelerate
    keeps its state per process and refused another precision ("restart your runtime completely"). (A process
    group already set up stays: Accelerate takes it up again.)"""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def adopt_config_compile(accelerator, args) -> None:
    """A dynamo backend in the accelerate config (or `accelerate launch --dynamo_backend`) made `prepare` compile
    the model around this package's compile: with --compile as well, torch.compile of the compiled model returned
    a plain function and the run crashed; without it, the run had none of --compile's child-process check and
    eager fallback (an AOT_EAGER backward failed in a raw RuntimeError), and its recompile count was wrong.
    INDUCTOR (torch's default) is taken as --compile, with the config's mode; other backends are refused."""
    from accelerate.utils import DynamoBackend

    plugin = getattr(accelerator.state, "dynamo_plugin", None)
    if plugin is None or plugin.backend == DynamoBackend.NO:
        return
    name = getattr(plugin.backend, "value", str(plugin.backend))
    if plugin.backend != DynamoBackend.INDUCTOR:
        raise TrainingError(
            f"dynamo_backend {name} (the accelerate config, or accelerate launch --dynamo_backend): adni-diffusers "
            "compiles with inductor itself, through --compile (tried in a child process first, eager if it fails). "
            "Set dynamo_backend to NO (`accelerate config`, or `accelerate launch --dynamo_backend no`), and pass "
            "--compile to compile")
    plugin.backend = DynamoBackend.NO  # prepare() leaves the model to maybe_compile
    mode = plugin.mode if plugin.mode not in (None, "default") else None
    if mode in COMPILE_MODES and args.compile_mode is None:
        args.compile_mode = mode
    if not args.compile:
        args.compile = True
        logger.info("dynamo_backend %s (the accelerate config): compiled as with --compile%s", name,
                    f" --compile_mode {args.compile_mode}" if args.compile_mode else "")


def warn_if_the_accelerate_config_is_not_read(args) -> None:
    """`python train_*.py` (the way for one-process batch jobs) reads no accelerate config: only `accelerate
    launch` does. A user whose default config says bf16 trained in float32 without a word (and a resume under
    python of a run started under the launcher switched precision)."""
    if args.mixed_precision is not None or "ACCELERATE_MIXED_PRECISION" in os.environ:
        return  # given here, or by `accelerate launch` (which sets it from the config or its flags)
    try:
        from accelerate.commands.config.config_args import default_config_file

        import yaml

        config = yaml.safe_load(Path(default_config_file).read_text()) if Path(default_config_file).is_file() \
            else None
    except Exception:  # noqa: BLE001 - no config, or one accelerate would refuse itself: nothing to say
        return
    precision = str((config or {}).get("mixed_precision") or "no") if isinstance(config, dict) else "no"
    if precision != "no":
        logger.warning("the accelerate config (%s) says mixed_precision %s, but only `accelerate launch` reads it: "
                       "this run, started without it, trains in float32. Pass --mixed_precision %s to the script",
                       default_config_file, precision, precision)


def keeps_session_logging(main):
    """For a stage's `main`: the run sets up logging for itself (INFO lines on the console, quieter libraries),
    and a notebook's session gets its own set-up back afterwards (its root logger had been left at INFO, with a
    console handler, so that every library's INFO lines printed), torch's TF32 and cuDNN-benchmark settings
    (torch_backend_settings) as they were before the run, and its random number generators where they were (the run
    seeds them all with --seed: the notebook's own draws after each run of a sweep started again from seed 0)."""
    import functools

    @functools.wraps(main)
    def run(*args, **kwargs):
        import datasets
        import diffusers

        root, names = logging.getLogger(), ("adni_diffusers", "accelerate")
        handlers, level = list(root.handlers), root.level
        backends = [(module, name, getattr(module, name)) for module, name in torch_backend_settings()]
        levels = {name: logging.getLogger(name).level for name in names}
        verbosity = (datasets.utils.logging.get_verbosity(), diffusers.utils.logging.get_verbosity())
        rng = random_states()
        try:
            return main(*args, **kwargs)
        finally:
            set_random_states(rng)
            for handler in [h for h in root.handlers if h not in handlers]:
                root.removeHandler(handler)
            root.setLevel(level)
            for name, was in levels.items():
                logging.getLogger(name).setLevel(was)
            datasets.utils.logging.set_verbosity(verbosity[0])
            diffusers.utils.logging.set_verbosity(verbosity[1])
            for module, name, was in backends:  # a sweep's next run (no --allow_tf32) trained with TF32 on
                setattr(module, name, was)
            release_output_dir()  # the run's lock on its --output_dir (hold_output_dir), however it ended

    return run


def random_states() -> tuple:
    """Python's, numpy's, torch's and (where CUDA is in use) each GPU's random state, as set_seed sets them."""
    import random

    import numpy as np

    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)


def set_random_states(states: tuple) -> None:
    import random

    import numpy as np

    python, numpy, cpu, cuda = states
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def torch_backend_settings() -> list[tuple[object, str]]:
    """The process-wide torch settings a run's flags change (apply_backend_flags): given back after a run called
    from Python, so that a notebook's sweep of `cli([...])` calls, or its sampling afterwards, does not run the next
    one with TF32 or cuDNN benchmarking that it did not ask for (and that its training_args.json says were off)."""
    return [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
            (torch.backends.cudnn, "benchmark")]


def _quiet_libraries(main: bool) -> None:
    import datasets
    import diffusers

    datasets.utils.logging.set_verbosity_warning() if main else datasets.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_warning() if main else diffusers.utils.logging.set_verbosity_error()


OUTPUT_DIRS_MADE: dict[Path, Path] = {}  # --output_dir: the topmost folder this process made for it


def remove_unused_output_dir(args) -> None:
    """A run refused after `prepare_output_dir` made its --output_dir (a missing data folder, a non-image file, a
    split that does not match the VQModel's) left it behind, empty: its empty folders are removed bottom-up, then
    the folders made above it while they are empty (another job's run beside it in a new sweep/ folder stays)."""
    output_dir = Path(getattr(args, "output_dir", None) or "")
    top = OUTPUT_DIRS_MADE.pop(output_dir, None)
    if top is None or not output_dir.is_dir():
        return
    inside = sorted((p for p in output_dir.rglob("*") if p.is_dir() and not p.is_symlink()),
                    key=lambda p: -len(p.parts))  # deepest first
    above = [p for p in output_dir.absolute().parents if p.is_relative_to(top)]
    for folder in [*inside, output_dir.absolute(), *above]:
        try:
            folder.rmdir()  # only an empty folder: a file anywhere below keeps it and the folders above
        except OSError:
            return


def prepare_output_dir(args, accelerator, product: str, project: str | None = None) -> None:
    """Refuse to write over a finished model unless asked; `product` is the file or folder that marks one.
    Nothing of an earlier run is removed here: `clear_earlier_run` does that once the data, --vqmodel and
    resumed checkpoint are known good (a typo in --train_data_dir with --overwrite_output_dir deleted the finished
    model, and the run failed all the same)."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingError(f"--output_dir {output_dir}: exists and is not a folder")
    other = other_stage_model(output_dir, project)
    if other:  # --overwrite_output_dir would delete its checkpoints and write this stage's files in among its own
        raise TrainingError(f"--output_dir {output_dir} holds {other}, not this script's: train into another "
                            "--output_dir (remove that folder yourself to reuse the name)")
    checkpoints = list_checkpoints(output_dir)
    existing = [p for p in [output_dir / product, *checkpoints] if p.exists()]
    # "latest" with no checkpoint starts fresh: it must not silently write over a finished model either
    resuming = _resumes(args, checkpoints)
    if existing and not resuming and not args.overwrite_output_dir:
        why = " and no checkpoint to resume" if args.resume_from_checkpoint else ""
        raise TrainingError(
            f"--output_dir {output_dir} already holds a model ({existing[0].name}){why}. Use "
            + ("" if why else "--resume_from_checkpoint latest to continue it, ")
            + "--overwrite_output_dir to replace it, or another --output_dir."
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not output_dir.exists():  # removed again if a check refuses the run before it wrote anything there
            top = output_dir.absolute()
            while not top.parent.exists():  # (and the folders made above it)
                top = top.parent
            OUTPUT_DIRS_MADE[output_dir] = top
        output_dir.mkdir(parents=True, exist_ok=True)
        # saves cut short (a sample grid's too: its .tmp, never a half picture under the real name)
        for stale in [*output_dir.glob("checkpoint-*.tmp"), output_dir / ".saving.tmp",
                      *output_dir.glob("samples/*.tmp")]:
            remove_path(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    # a folder no process can write in (a read-only mount) is refused now, not after the data work (minutes on
    # ADNI); every process tries a file of its own (each writes its random states into the checkpoints)
    probe = output_dir / f".write_check-{accelerator.process_index}.tmp"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        error = TrainingError(f"--output_dir {output_dir}: cannot write there ({e.strerror or e})")
        error.every_process = False  # (a node's own mount may be read-only)
        raise error from None


def _resumes(args, checkpoints: list[Path]) -> bool:
    """Whether this run goes on from a checkpoint: `latest` with none in --output_dir starts fresh."""
    return args.resume_from_checkpoint is not None and (args.resume_from_checkpoint != "latest" or bool(checkpoints))


def clear_earlier_run(args, accelerator, product: str, project: str | None = None) -> None:
    """Call after every check, just before training starts. With --overwrite_output_dir (not resuming) the
    earlier model and its checkpoints, samples, evaluation and logs go. A run that starts from step 0 starts a new
    loss history, and new tensorboard events for `project` when the logging folder is inside --output_dir (one
    elsewhere may be shared: it is left alone)."""
    output_dir = Path(args.output_dir)
    checkpoints = list_checkpoints(output_dir)
    resuming = _resumes(args, checkpoints)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from .hub import mark_training_started

        # from here until the final save (push_if_asked) the folder mixes runs (the earlier model removed or kept
        # beside this run's records): `adni-diffusers push` refuses it while the marker is there. A resume marks it
        # once its checkpoint has passed TrainingRun.resume's checks: a refused resume changed nothing here
        if not resuming:
            mark_training_started(output_dir, STAGE_SCRIPTS.get(project, "a training run"))
        logs = logging_folder(args)
        logs_inside = logs.is_relative_to(output_dir.resolve())
        earlier = []
        if args.overwrite_output_dir and not resuming:
            # evaluation/ too: its numbers (which the model card shows and a push uploads) are the old model's; and
            # the branches an earlier resume set aside (checkpoint-N.abandoned) and the results it moved
            earlier = [output_dir / product, *checkpoints, output_dir / "loss_curve.png", output_dir / "samples",
                       output_dir / "evaluation", output_dir / "trace", *([logs] if logs_inside else []),
                       *output_dir.glob("checkpoint-*.abandoned*"), *output_dir.glob("evaluation-of-step-*")]
        if not resuming:  # the loss history (logs/history.jsonl whatever --logging_dir) starts at step 1 again,
            # and so do the --trace_batches rows (a dead attempt's would read as batches trained twice)
            earlier += [output_dir / HISTORY_FILE, output_dir / "trace"]
            if project and logs_inside:  # a run that died before its first checkpoint: its curves would mix in
                earlier.append(logs / project)
        for p in earlier:
            remove_path(p, ignore_errors=True)
    accelerator.wait_for_everyone()


# the training script of each stage, by its project name (tensorboard's, and `stage` in the run record)
STAGE_SCRIPTS = {"vqmodel": "train_vqmodel.py", "unet": "train_unet.py"}


def other_stage_model(output_dir: Path, project: str | None) -> str | None:
    """What `output_dir` holds when it is the other stage's run or model, in words; else None. The run's own
    record (training_data.json, written before its first step) decides; the files only where there is none (a
    bare diffusers folder): a UNet run cut short while saving has vqvae/ without model_index.json too."""
    words = {"vqmodel": "a VQModel (the output of train_vqmodel.py)", "unet": "a pipeline (the output of train_unet.py)"}
    stage = read_json_object(output_dir / "training_data.json").get("stage")
    if stage is None:
        pipeline = (output_dir / "model_index.json").is_file()
        stage = "unet" if pipeline else "vqmodel" if (output_dir / "vqvae" / "config.json").is_file() else None
    return words.get(stage) if project and stage and stage != project else None


def check_output_outside_data(args) -> None:
    """Refuse an --output_dir inside the folder the run reads (--train_data_dir, the VQModel's folder train_unet.py
    filled in there, else the demo set's): made before the data is scanned, it was read as a class folder of
    folders ("class folders must hold images, not further folders"), naming neither flag."""
    name = "train_data_dir" if getattr(args, "train_data_dir", None) else "demo_data_dir"
    data = getattr(args, name, None)
    if not data:
        return
    # the tensorboard folder and train_unet's latent cache too: their files (events, .safetensors) made every later
    # run on that data fail as "files that are not images", naming neither flag
    written = [("output_dir", args.output_dir, Path(args.output_dir)),
               ("logging_dir", getattr(args, "logging_dir", None), logging_folder(args)),
               ("latent_cache_dir", getattr(args, "latent_cache_dir", None), getattr(args, "latent_cache_dir", None))]
    for flag, given, folder in written:
        if given and read_as_data(Path(folder), Path(data)):
            raise TrainingError(f"--{flag} {given}: inside the data folder {data} (--{name}), where the run's "
                                f"files would be read as data; choose a folder outside it")


def start_stage(args, config_of, project_name: str, product: str, stage_flags: tuple[str, ...] = ()):
    """What both training scripts do first, in this order so that every bad flag fails before any work: the
    model config from --preset (`config_of`, e.g. `presets.vq_config`), the Accelerator, the output folder
    check, and a resumed checkpoint's flags (`stage_flags`: the stage's own beside RESUME_MUST_MATCH; its model
    is compared once the script has its final config, `check_resume_model`, and its data when `TrainingRun.resume`
    loads it). The data comes next (`load_training_data`).
    Returns (config, accelerator)."""
    with alike_on_every_process():
        return _start_stage(args, config_of, project_name, product, stage_flags)


def _start_stage(args, config_of, project_name: str, product: str, stage_flags: tuple[str, ...]):
    from .presets import PresetError

    check_output_outside_data(args)
    try:
        config = config_of(args.preset)
    except PresetError as e:
        raise TrainingError(str(e)) from None
    accelerator = make_accelerator(args, project_name)
    if accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:
        # Accelerate takes ACCELERATE_GRADIENT_ACCUMULATION_STEPS (set by `accelerate launch` for DeepSpeed, or
        # exported) over the flag: the loop's step counts, the LR schedule and the CUDA-graph checks read the flag
        raise TrainingError(
            f"Accelerate accumulates gradients over {accelerator.gradient_accumulation_steps} steps "
            f"(ACCELERATE_GRADIENT_ACCUMULATION_STEPS={os.environ.get('ACCELERATE_GRADIENT_ACCUMULATION_STEPS')}) but "
            f"--gradient_accumulation_steps is {args.gradient_accumulation_steps}: unset the variable or pass the "
            "same number to --gradient_accumulation_steps")
    check_no_run_trains_into(args.output_dir)  # before prepare_output_dir clears that run's save under way
    prepare_output_dir(args, accelerator, product=product, project=project_name)
    if accelerator.is_main_process:
        hold_output_dir(args.output_dir, STAGE_SCRIPTS.get(project_name, "a training run"))
    accelerator.wait_for_everyone()
    warn_if_the_launcher_kills_early(accelerator, f"train_{project_name}")
    resume_from = find_resume_checkpoint(args)
    if resume_from is None and args.resume_from_checkpoint == "latest":
        # said here, once a run: the run looks for a checkpoint several times (its checks, the resume)
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting fresh", args.output_dir)
    if resume_from is not None:
        check_resume_matches(resume_from, run_record(args, stage_flags, stage=project_name))  # the clearer message
        check_checkpoint_whole(resume_from, args.resume_from_checkpoint)
        check_checkpoint_files(resume_from, accelerator)
    return config, accelerator


def check_no_run_trains_into(output_dir) -> None:
    """Refuse an --output_dir another run of this host is training into (its .training_in_progress names a live
    process of ours): the two runs' checkpoints, history and model would mix."""
    from .hub import TRAINING_MARKER, live_training_run

    if run := live_training_run(output_dir):
        raise TrainingError(
            f"--output_dir {output_dir}: {run} is training into it on this host ({TRAINING_MARKER}); two runs in one "
            "folder mix their checkpoints, logs and model. Wait for it, stop it (its checkpoint then lets "
            "--resume_from_checkpoint latest go on), or give another --output_dir; if no such run is going on, "
            f"delete {Path(output_dir) / TRAINING_MARKER}")


# the --output_dir this process trains into, locked (files.only_writer) until the run ends or the process dies
_OUTPUT_DIR_HELD = contextlib.ExitStack()


def hold_output_dir(output_dir, script: str) -> None:
    """Lock --output_dir for this run (the main process's), from its start to its end. The run marks the folder
    (.training_in_progress) only once its data and latent cache are ready, minutes on ADNI: two runs started
    together (a job array's tasks given one --output_dir, a rerun while the first still loads its data) both passed
    `check_no_run_trains_into`, saved checkpoint-2 over each other, and one died on the other's checkpoint-4.tmp,
    its history and model a mix of both. Released when the stage's `main` ends (`keeps_session_logging`), before
    `run_cli` removes the folder of a run refused at its start, and by the OS when the process dies."""
    from .files import FolderInUse, only_writer

    release_output_dir()
    try:
        _OUTPUT_DIR_HELD.enter_context(only_writer(Path(output_dir), "--output_dir", script))
    except FolderInUse as e:
        raise TrainingError(f"{e}: two runs in one folder mix their checkpoints, logs and model") from None


def release_output_dir() -> None:
    _OUTPUT_DIR_HELD.close()


BATCH_JOB_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")  # SLURM, PBS/Torque, LSF, SGE


def launcher_flags() -> list[str] | None:
    """The flags of the `accelerate launch` that started this process (its parent's command line, up to the
    script), or None where it was not started so (or where that cannot be told: not Linux)."""
    try:
        words = [w.decode(errors="replace") for w in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return None
    for i, word in enumerate(words):
        # `accelerate launch ...` (the console script), `python -m accelerate.commands.launch ...`
        if word == "accelerate.commands.launch" or (word == "launch" and i and Path(words[i - 1]).name == "accelerate"):
            flags = []
            for flag in words[i + 1:]:
                if flag.endswith(".py") or flag in ("-m", "--module"):  # the script: its own flags follow
                    break
                flags.append(flag)
            return flags
    return None


def launcher_num_processes() -> int | None:
    """The `--num_processes` of the `accelerate launch` that started this process, or None where its command line
    does not give one (a config file's, or not started so)."""
    flags = launcher_flags() or []
    for i, flag in enumerate(flags):
        value = flag.partition("=")[2] if flag.startswith("--num_processes=") else \
            flags[i + 1] if flag == "--num_processes" and i + 1 < len(flags) else None
        if value is not None and value.isdigit():
            return int(value)
    return None


def warn_about_launcher_flags_not_passed_on(accelerator) -> None:
    """`accelerate launch --gradient_accumulation_steps N` is passed on to DeepSpeed alone: the run accumulated
    the script's --gradient_accumulation_steps (1), and only the log's "x 1 accumulated" told."""
    flags = launcher_flags() or []
    if any(f == "--gradient_accumulation_steps" or f.startswith("--gradient_accumulation_steps=") for f in flags):
        logger.warning("`accelerate launch --gradient_accumulation_steps` is passed on to DeepSpeed alone: this run "
                       "accumulates the script's --gradient_accumulation_steps (%d); give the flag after the "
                       "script's name", accelerator.gradient_accumulation_steps)


def stage_command(stage: str) -> str:
    """How to start the training stage `stage` ("train_vqmodel", "train_unet") without a launcher, the way this
    process was started: `python -m adni_diffusers.train_unet` where it runs the package's own module
    (`accelerate launch -m adni_diffusers.train_unet`; a pip install has no top-level train_unet.py), `python
    train_unet.py` otherwise (the repository's launcher scripts)."""
    try:
        in_package = Path(sys.argv[0]).resolve().parent == Path(__file__).resolve().parent
    except (OSError, IndexError, RuntimeError):
        in_package = False
    return f"python -m {__package__}.{stage}" if in_package else f"python {stage}.py"


def warn_if_the_launcher_kills_early(accelerator, stage: str | None = None) -> None:
    """A batch job of one process under `accelerate launch` (its simple launcher: no --multi_gpu): from accelerate
    1.16 that launcher answers SIGTERM by sending it on and killing the run 5 s later (`_terminate_process_tree`),
    too soon for the checkpoint a time limit's SIGTERM asks for. `python train_*.py` (or `python -m
    adni_diffusers.train_*`) needs no launcher. `stage`: "train_vqmodel" or "train_unet" (default: from argv)."""
    if accelerator.num_processes != 1 or not any(os.environ.get(v) for v in BATCH_JOB_VARIABLES):
        return
    import accelerate
    import accelerate.commands.launch as launch

    if hasattr(launch, "_terminate_process_tree") and launcher_flags() is not None:
        if stage is None:
            named = Path(sys.argv[0]).stem if sys.argv else ""
            stage = named if named in ("train_vqmodel", "train_unet") else "train_unet"
        logger.warning("this batch job runs one process under `accelerate launch`, whose launcher (accelerate %s) "
                       "kills it 5 s after passing on a SIGTERM: a time limit's SIGTERM may then cut the run before "
                       "its checkpoint. Start one-process jobs with `%s` and the same flags (Accelerate needs "
                       "no launcher for one process)", accelerate.__version__, stage_command(stage))


def check_resume_model(args, config: dict, project_name: str, identity: dict | None = None) -> None:
    """Refuse a resumed checkpoint of another model (--preset, --conditional, the class folders; `identity`: what
    else is known by then, e.g. the UNet's VQModel) as soon as the model's config is known, before the slices are
    decoded: `TrainingRun.resume` compared it only after that (minutes on ADNI), and the data it also compares comes
    later."""
    check_resume_identity(args, project_name, {"model_config": config, **(identity or {})})


def check_resume_identity(args, project_name: str, identity: dict, also_accepted: dict | None = None) -> None:
    """Refuse a resumed checkpoint whose recorded `identity` (any of its entries) differs from this run's, before
    the work that needs it: the UNet compares its latents' key before it encodes every slice."""
    resume_from = find_resume_checkpoint(args)
    if resume_from is not None:
        check_resume_matches(resume_from, run_record(args, identity=identity, stage=project_name,
                                                     also_accepted=also_accepted))


GRID_STEP_RE = re.compile(r"[a-z]+-(\d+)\.png")  # samples/samples-000030.png, samples/reconstructions-000250.png
CHECKPOINT_FILES = ("training_state.json", "model.safetensors", "optimizer.bin", "scheduler.bin")


def damaged_checkpoint_files(path: Path) -> list[str]:
    """What of checkpoint `path` is there but not whole (a copy or a disk cut short; a save of this package is
    renamed into place only when finished): training_state.json that is not a record with a step, a .safetensors
    file shorter than its header says, a torch file (.bin, .pt, .pkl) that is not a whole zip archive. Each as
    "name (why)"; missing files are check_checkpoint_files' to name. Reads headers and archive ends only."""
    import zipfile

    from .pipeline_adni_ldm import safetensors_cut_short

    damaged = []
    state = path / "training_state.json"
    if state.is_file():
        try:
            if not isinstance(json.loads(state.read_text(encoding="utf-8")).get("step"), int):
                damaged.append(f"{state.name} (no step)")
        except (ValueError, UnicodeDecodeError, AttributeError):
            damaged.append(f"{state.name} (not a JSON record)")
    for file in sorted(path.rglob("*")):
        if file.suffix == ".safetensors" and (why := safetensors_cut_short(file)):
            damaged.append(f"{file.relative_to(path).as_posix()} ({why})")
        elif file.suffix in (".bin", ".pt", ".pkl") and file.is_file() and not zipfile.is_zipfile(file):
            damaged.append(f"{file.relative_to(path).as_posix()} ({file.stat().st_size} bytes, not a whole torch "
                           "file)")
    return damaged


def check_checkpoint_whole(path: Path, flag: str) -> None:
    """Refuse a damaged checkpoint before anything reads it, naming the files and a whole checkpoint beside it to
    resume from instead: safetensors' "invalid header length", torch's "failed reading zip archive" or a JSON
    error came with a traceback that named no file, and `latest` never said an earlier checkpoint was whole."""
    damaged = damaged_checkpoint_files(path)
    if not damaged:
        return
    whole = next((p for p in reversed(list_checkpoints(path.parent)) if p.resolve() != path.resolve()
                  and all((p / name).is_file() for name in CHECKPOINT_FILES) and not damaged_checkpoint_files(p)),
                 None)
    instead = (f"{whole} is whole: resume from it with --resume_from_checkpoint {whole}" if whole else
               f"no other checkpoint in {path.parent} is whole: start a new run")
    raise TrainingError(f"--resume_from_checkpoint {flag}: {path} is damaged: {'; '.join(damaged)} (a copy or disk "
                        f"that did not finish?); {instead}")


def check_checkpoint_files(path: Path, accelerator) -> None:
    """A checkpoint folder missing a file (emptied, copied in part, another tool's) is refused before any work,
    naming the file: accelerate's own error came after the data had loaded, named a file the checkpoint never
    had (pytorch_model.bin), or came after the weights were already loaded."""
    needed = [*CHECKPOINT_FILES, *(["scaler.pt"] if accelerator.scaler is not None else [])]
    missing = [name for name in needed if not (path / name).is_file()]
    if missing == ["scaler.pt"]:
        raise TrainingError(f"--resume_from_checkpoint {path} was written without --mixed_precision fp16 (it has no "
                            "scaler.pt, the fp16 loss scale): resume it with the precision it was written with, or bf16")
    if missing:
        raise TrainingError(f"--resume_from_checkpoint {path}: not a complete checkpoint of this package (no "
                            f"{', '.join(missing)}); use another checkpoint-<step> folder, or start a new run")


@contextlib.contextmanager
def main_process_then_each_node_first(accelerator):
    """For work that fills a cache the other processes then read (the demo set, datasets' file index, the latent
    cache): the main process first, then the first process of each other node, then the rest. A node-local cache
    (a node's /tmp, its own Hugging Face cache) is then built once per node; under `main_process_first` alone
    every process of the other nodes built it at once. A shared folder is still built once, by the main process."""
    with accelerator.main_process_first(), accelerator.local_main_process_first():
        yield


def data_root(args, accelerator) -> Path:
    """--train_data_dir, or the demo set's folder (built once) when none is given."""
    if args.train_data_dir is not None:
        return Path(args.train_data_dir)
    from .demo_data import ensure_demo_dataset

    try:
        with main_process_then_each_node_first(accelerator):
            root = ensure_demo_dataset(args.demo_data_dir)
    except FileExistsError as e:  # a file, or a folder of other things (it names the folder): it builds nothing there
        raise TrainingError(f"--demo_data_dir {e}") from None
    logger.info("no --train_data_dir: using the synthetic demo set in %s (NOT ADNI)", root)
    return Path(root)


def class_folders(args, accelerator) -> tuple[Path, list[str]]:
    """(data folder, class names) from the folder layout alone, seconds before `load_training_data` has decoded
    the slices: what the UNet's compile check needs to start first. The names are those the data gets."""
    from .data import DataError, scan_tree

    with alike_on_every_process():  # every process reads the same folder
        root = data_root(args, accelerator)
        try:
            return root, list(scan_tree(root).class_names)
        except DataError as e:
            raise TrainingError(str(e)) from None


def load_training_data(args, accelerator, root: Path | None = None):
    """The slices, split as asked; the demo set is built (once) when no folder is given. `root`: the folder
    `class_folders` found (train_unet asks it first), so that its demo-set lines are not logged twice."""
    with alike_on_every_process():  # every process decodes the same folder
        return _load_training_data(args, accelerator, root)


def _load_training_data(args, accelerator, root: Path | None):
    from .data import DataError, load_slices

    root = root or data_root(args, accelerator)
    try:
        # the main process builds datasets' file index first (the others read it); then every process decodes the
        # slices itself, all at once (there is no shared cache of decoded pixels; in the ordered section the others
        # waited through the main process's whole decode, then each node's first)
        data = load_slices(root, split=args.split, val_fraction=args.val_fraction, seed=split_seed(args),
                           preprocess=args.preprocess, patient_ids=args.patient_ids,
                           while_indexing=lambda: main_process_then_each_node_first(accelerator))
    except DataError as e:
        raise TrainingError(str(e)) from None
    if len(data.train) < args.train_batch_size * accelerator.num_processes:
        raise TrainingError(
            f"{root}: {len(data.train)} training images, fewer than one batch "
            f"({args.train_batch_size} x {accelerator.num_processes} processes); lower --train_batch_size"
        )
    batches = len(data.train) // (args.train_batch_size * accelerator.num_processes)  # per process (drop_last)
    if args.gradient_accumulation_steps > batches:  # a step was the whole epoch, fewer images than logged and scaled
        raise TrainingError(
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps}: more than the {batches} batches of an "
            f"epoch ({len(data.train)} training images, batch {args.train_batch_size} x "
            f"{accelerator.num_processes} process(es)), so each step would be the whole epoch, not the "
            f"{args.gradient_accumulation_steps} batches the logs and --scale_lr count; give at most {batches}")
    from .data import is_demo_dataset

    if accelerator.is_main_process:  # the classes found, before hours of training (an export's MCI/ is one)
        logger.info("%s: %s", root, data_overview(data))
    data_source = "demo" if args.train_data_dir is None or is_demo_dataset(root) else "user"
    return data, data_source


def data_overview(data) -> str:
    """One line: each class with its training and held-out images and patients, and the split."""
    def counts(part, k=None):
        picked = [i for i, y in enumerate(part.labels.tolist()) if k is None or y == k]
        patients = len({part.patients[i] for i in picked})
        return f"{len(picked)} images of {patients} patient{'' if patients == 1 else 's'}"

    if not data.class_names:
        classes = f"no class folders: {counts(data.train)} for training, {counts(data.val)} held out"
    else:
        classes = "; ".join(f"{name}: {counts(data.train, k)} for training, {counts(data.val, k)} held out"
                            for k, name in enumerate(data.class_names))
        classes = f"{len(data.class_names)} classes ({classes})"
    return f"{classes}; --split {data.split}"


def split_seed(args, default=None):
    """The seed that draws the held-out patients: --split_seed, else --seed (else `default`). `args`: the parsed
    flags, or their record (training_args.json) as a dict."""
    flags = args if isinstance(args, dict) else vars(args)
    return flags.get("seed", default) if flags.get("split_seed") is None else flags["split_seed"]


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a log written a line at a time. A line a crash or a full disk cut short (half a row, NUL bytes)
    is skipped with a warning: it made every resume of the run fail, its checkpoints intact."""
    rows, bad = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip("\x00 \t\r"):
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        logger.warning("%s: skipped %d line(s) that are not whole rows (a write cut short by a crash?)", path, bad)
    return rows


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A fresh permutation each epoch, a pure function of (seed, epoch): resume needs no RNG state."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class _BatchedFetch(torch.utils.data.Dataset):
    """Lets the training DataLoader fetch a whole batch with one `dataset.get_batch(indices)` call
    (torch's `__getitems__` protocol) instead of collating items one by one."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]

    def __getitems__(self, indices: list[int]):
        return self.dataset.get_batch(indices)


def _ready_batch(batch):
    return batch


def make_dataloader(dataset, args, accelerator):
    """Batches per process; Accelerate shards them (process i gets batches i, i+N, ...)."""
    sampler = EpochShuffleSampler(len(dataset), args.seed)
    batched = hasattr(dataset, "get_batch")  # ready batches: nothing left to collate
    on_host = getattr(dataset, "device", torch.device("cpu")).type == "cpu"  # else batches are cut on the GPU
    loader = torch.utils.data.DataLoader(
        _BatchedFetch(dataset) if batched else dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=_ready_batch if batched else None,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available() and on_host,
        persistent_workers=args.dataloader_num_workers > 0,
        worker_init_fn=_ignore_stop_signals if args.dataloader_num_workers > 0 else None,
    )
    return loader, sampler


def stop_loader_workers(loader) -> None:
    """Stop a loader's persistent worker processes now, while the interpreter is fully alive.

    Left running, the workers of a loader with `pin_memory` are joined by the exit hook of older torch
    releases with a 5 s timeout each, without being told to stop (pytorch/pytorch#81794): the likely cause of
    the 24 s a finished 4-worker VQ run took to exit on the H200 (torch 2.11). Stopped here they exit at once
    and free their memory before the evaluation. Torch has no public call for this; `_shutdown_workers` is
    what the iterator's own `__del__` runs."""
    base = getattr(loader, "base_dataloader", loader)  # Accelerate's loaders wrap the torch DataLoader
    iterator = getattr(base, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        base._iterator = None  # a later iteration starts fresh workers


def make_optimizer(params, args, accelerator, default_batch: int):
    lr = scaled_learning_rate(args, accelerator.num_processes, default_batch)
    if args.scale_lr and accelerator.is_main_process:
        logger.info("--scale_lr %s: learning rate %g (--learning_rate %g for a batch of %d; this run's is %d)",
                    args.scale_lr, lr, args.learning_rate, default_batch,
                    args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes)
    fused = torch.cuda.is_available() and accelerator.device.type == "cuda"
    return torch.optim.AdamW(
        params, lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon, fused=fused or None,
    )


def scaled_learning_rate(args, num_processes: int, default_batch: int, learning_rate: float | None = None) -> float:
    """--learning_rate (or `learning_rate`: the VQ discriminator's), times (effective batch / default batch) with
    --scale_lr linear, or its square root with --scale_lr sqrt."""
    lr = args.learning_rate if learning_rate is None else learning_rate
    ratio = args.gradient_accumulation_steps * args.train_batch_size * num_processes / default_batch
    if not args.scale_lr:
        return lr
    return lr * (math.sqrt(ratio) if args.scale_lr == "sqrt" else ratio)


def make_lr_scheduler(optimizer, args, accelerator, max_train_steps: int):
    from diffusers.optimization import get_scheduler

    # A prepared scheduler steps once per process per optimizer step (as in diffusers' examples).
    return get_scheduler(
        args.lr_scheduler, optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )


def prepare_for_training(accelerator, args, model, optimizer, loader):
    """`accelerator.prepare` the model, optimizer and loader, then make and prepare the LR schedule: its length
    needs the prepared loader, which holds this process's share of the batches. (Counted on the loader before
    prepare, every process's batches, the schedule was num_processes times too long.)
    Returns (model, optimizer, loader, lr_scheduler), all prepared."""
    model, prepared_optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # made on the plain optimizer, so that prepare ties the schedule to its prepared optimizer
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator, total_train_steps(args, loader))
    return model, prepared_optimizer, loader, accelerator.prepare(lr_scheduler)


# The mode `train_unet --compile` picks when --compile_mode is not given, on one CUDA process: a whole train_unet run
# trained with CUDA graphs at 57 ms a step against 86 ms for the default mode's step (H200, 2026-12-04,
# docs/performance.md). Several processes (DDP's hooks around graphs) and the VQ stage are not measured.
UNET_CUDA_COMPILE_MODE = "reduce-overhead"


def choose_compile_mode(args, accelerator, measured_mode: str | None) -> None:
    """--compile without --compile_mode: `measured_mode` (the stage's measured best) where it was measured, i.e.
    on one CUDA process without gradient accumulation (which CUDA graphs cannot do); else torch's default. The
    choice is kept in training_args.json (`compile_mode`, `compile_mode_chosen`)."""
    if not args.compile or getattr(args, "compile_mode", None) is not None or measured_mode is None:
        return
    if accelerator.device.type != "cuda" or accelerator.num_processes != 1:
        return
    if measured_mode in CUDA_GRAPH_MODES and args.gradient_accumulation_steps > 1:
        return
    args.compile_mode = measured_mode
    args.compile_mode_chosen = f"{measured_mode}: --compile on one CUDA process without --compile_mode"
    logger.info("--compile: compile mode %s (CUDA graphs), the fastest measured for this stage on one GPU; "
                "--compile_mode default keeps torch's default", measured_mode)


def start_compile_check(args, spec: dict):
    """Start the compile check's child process now (`compile_probe.ChildStep`; on CUDA with --compile only), so
    that it compiles and runs its step while this process decodes slices or builds the latent cache; hand the
    result to `maybe_compile`. None where no child is needed."""
    from . import compile_probe

    if not args.compile or not compile_probe.needed(spec):
        return None
    passed = compile_probe.passed_before(spec)
    mode = spec["compile_mode"]
    chosen = getattr(args, "compile_mode_chosen", None) and mode in CUDA_GRAPH_MODES  # not asked for by the user
    failed = compile_probe.graphs_failed_before(spec) if chosen and not passed else None
    if failed:  # the default mode failed here with CUDA graphs before: no second wait for the same failure
        without = compile_probe.WITHOUT_CUDA_GRAPHS[mode]
        logger.warning("--compile: this training step failed with --compile_mode %s in a child before (%s); "
                       "compiling with --compile_mode %s", mode, failed, without)
        args.compile_mode, args.compile_mode_fallback = without, f"{mode} -> {without}: {failed} (an earlier run)"
        spec = {**spec, "compile_mode": without}
        passed = compile_probe.passed_before(spec)
    if passed:
        return spec  # `maybe_compile` skips the child if every process has the record, else starts one then
    logger.info("--compile: a child process compiles and runs one training step (mode %s) while this one "
                "goes on", spec["compile_mode"] or "default")
    return compile_probe.ChildStep(spec)


def maybe_compile(model, args, probe=None, child_probe=None):
    """`torch.compile` when asked (--compile, --compile_mode). Compilation happens at the first call, so
    only a training step catches a compiler failure; on failure: eager, with a warning.

    `child_probe` runs that step in a child process first, on CUDA: a CUDA error in a compiled kernel
    (facts.md: "misaligned address" in an inductor GroupNorm backward at batch 512) leaves the device unusable
    in the process that hit it, so only a child can hit it safely. It is either the child already started by
    `start_compile_check` (the scripts do that, so it runs beside their data work) or a `compile_probe.make_spec`
    to start one now. A child that ran out of GPU memory beside this process's work is tried once more alone.
    With several processes, all train compiled only if every child passed. A mode with CUDA graphs that fails
    there is tried once more without them (`reduce-overhead` -> `default`, `max-autotune` ->
    `max-autotune-no-cudagraphs`) before training eager; `args.compile_mode` then says the mode that runs.
    A step that passed in a child before (`compile_probe.passed_before`: a rerun, a resume) needs no child.
    `probe(compiled)` then runs one real training step's forward and backward in this process (the compile
    itself, before the first step); a CUDA error there stops the run with advice instead of failing again,
    less clearly, in the first eager step. `args.compile_seconds` (in training_args.json) records what the
    child processes took from the first one's start to the last answer (`child_processes`), how long this
    process waited for them (`waited_for_child`: less where the first one ran beside the data work) and the
    compile here (`first_step_here`)."""
    from . import compile_probe

    if not args.compile:
        return model  # (start_compile_check starts no child without --compile)
    started = None if child_probe is None or isinstance(child_probe, dict) else child_probe  # a ChildStep
    args.compile_seconds = {}
    spec = started.spec if started else child_probe
    if spec is not None and compile_probe.needed(spec):
        waiting_since = time.time()
        passed, why = _child_step_passes(spec, started)
        mode = spec["compile_mode"]
        if not passed and mode in CUDA_GRAPH_MODES:
            # CUDA graphs add failure modes of their own; the same mode without them still beats eager by far
            without, graphs_failed = compile_probe.WITHOUT_CUDA_GRAPHS[mode], why
            logger.warning("torch.compile with --compile_mode %s failed in the child process's training step at "
                           "batch size %s (%s); trying --compile_mode %s", mode, args.train_batch_size, why, without)
            passed, why = _child_step_passes({**spec, "compile_mode": without})
            if passed:
                args.compile_mode_fallback = f"{mode} -> {without}: {graphs_failed}"  # kept in training_args.json
                args.compile_mode = without
                if compile_probe.repeatable_failure(graphs_failed):
                    compile_probe.remember_graphs_failed(spec, graphs_failed)
        first_child_started = started.started if started else waiting_since
        args.compile_seconds["child_processes"] = round(time.time() - first_child_started, 1)
        args.compile_seconds["waited_for_child"] = round(time.time() - waiting_since, 1)
        if not passed:
            logger.warning("torch.compile failed in the child process's training step at batch size %s (%s); "
                           "training eager", args.train_batch_size, why)
            return model
    compiled = compile_probe.compile_model(model, getattr(args, "compile_mode", None))
    if probe is None:
        return compiled
    failure = None
    try:
        started = time.time()
        # no gradient all-reduce in the probe: a process whose probe failed must not leave the others one
        # collective ahead (they would average its first real step with their probe, then hang)
        with model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext():
            probe(compiled)
        args.compile_seconds["first_step_here"] = round(time.time() - started, 1)  # compilation included
        logger.info("--compile: the first compiled step here took %.0f s, compilation included",
                    args.compile_seconds["first_step_here"])
    except Exception as e:  # noqa: BLE001 - any compiler failure means: run eager
        first_line = str(e).splitlines()[0] if str(e) else ""
        if is_cuda_fault(e):
            raise TrainingError(
                f"--compile: the compiled model's first training step at batch size {args.train_batch_size} hit a "
                f"CUDA error ({first_line}), which leaves the GPU unusable in this process. Nothing was trained "
                "yet. Rerun without --compile, or with another --train_batch_size or --compile_mode."
            ) from e
        failure = f"{type(e).__name__}: {first_line}"
    finally:
        for p in model.parameters():
            p.grad = None  # the probe's gradients are not a training step
    if not _every_process_agrees(failure is None):  # all compiled, or all eager
        from accelerate import PartialState

        # a process's own failure shows from every process (other processes than the main one log errors only)
        level = logging.WARNING if failure is None or PartialState().is_main_process else logging.ERROR
        logger.log(level, "torch.compile failed (%s); training eager", failure or "in another process")
        return model
    return compiled


# How a CUDA fault reads: from torch, from Triton's launcher (most inductor kernels) and from cuDNN
CUDA_FAULT_RE = re.compile(r"CUDA error|Triton Error \[CUDA\]|CUDNN_STATUS_EXECUTION_FAILED|illegal memory access|"
                           r"misaligned address")


def is_cuda_fault(error: BaseException) -> bool:
    """Whether `error` left the CUDA context unusable (training eager in the same process would fail too)."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(error, accelerator_error)) or bool(
        CUDA_FAULT_RE.search(str(error)))


def _child_step_passes(spec: dict, started=None) -> tuple[bool, str]:
    """The child's compiled training step (compile_probe), agreed by every process: (passed, why not).
    `started`: that child, already running (`start_compile_check`); else one is started now, unless this step
    passed in a child before (`compile_probe.passed_before`; the processes still agree, as they would after a child)."""
    from . import compile_probe

    waiting_since = time.time()
    record = compile_probe.passed_before(spec) if started is None else None
    if record:
        logger.info("--compile: this training step (mode %s) passed in a child process before, with the same model, "
                    "batch, precision, GPU and software (%s): no child this time", spec["compile_mode"] or "default",
                    record)
        passed, why = True, ""
    elif started is None:
        logger.info("--compile: trying a compiled training step in a child process first (mode %s)",
                    spec["compile_mode"] or "default")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # leave the child the memory this process is not using
        passed, why = compile_probe.passes_in_child(spec)
    else:
        passed, why = started.result()
        if not passed and compile_probe.ran_out_of_memory(why):
            logger.warning("--compile: the child process ran out of GPU memory beside this process's work (%s); "
                           "trying it alone", why)
            return _child_step_passes(spec)
    if not _every_process_agrees(passed):
        return False, why or "on another process"
    if not record:
        logger.info("--compile: the child process's compiled step ran (waited %.0f s for it); compiling here",
                    time.time() - waiting_since)
    return True, ""


def _every_process_agrees(flag: bool) -> bool:
    """True only if `flag` is True on every process (one collective; the same answer everywhere)."""
    from accelerate import PartialState
    from accelerate.utils import gather

    state = PartialState()
    if state.num_processes == 1:
        return flag
    return bool(gather(torch.tensor([int(flag)], device=state.device)).min())


def bare_model(accelerator, model):
    """The model inside DDP and torch.compile, leaving both as they are. accelerate's `unwrap_model` re-points a
    compiled wrapper's `_orig_mod` past DDP (keep_torch_compile=True, its default): DDP's `no_sync` then no longer
    applies, and every gradient-accumulation micro-batch all-reduces its gradients."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def to_channels_last(model, args):
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def steps_per_epoch(loader, grad_accum: int) -> int:
    return _steps_in(len(loader), grad_accum)


def _steps_in(batches: int, grad_accum: int) -> int:
    """Optimizer steps over `batches` micro-batches: the last one may be short (see `micro_batch_weight`)."""
    return max(1, math.ceil(batches / grad_accum))


def micro_batch_weight(batch_in_epoch: int, batches_in_epoch: int, grad_accum: int) -> float:
    """The loss weight of micro-batch `batch_in_epoch` (0-based) of an epoch. Accelerate divides every micro-batch's
    loss by `grad_accum`; an epoch whose batches do not divide by it ends with a step of fewer micro-batches (the
    remainder), whose gradient would be only remainder / grad_accum of their mean. Weighting them by
    grad_accum / remainder makes it their mean, as every full step's gradient is."""
    last_step_start = (_steps_in(batches_in_epoch, grad_accum) - 1) * grad_accum
    if batch_in_epoch < last_step_start:
        return 1.0
    return grad_accum / (batches_in_epoch - last_step_start)


def total_train_steps(args, loader) -> int:
    """Optimizer steps of the whole run: --max_train_steps, else --num_epochs of the (prepared) loader."""
    return args.max_train_steps or args.num_epochs * steps_per_epoch(loader, args.gradient_accumulation_steps)


# -------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(output_dir) -> list[Path]:
    """Finished checkpoints, oldest first. A `checkpoint-N.tmp` (a save cut short) never counts."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, output_dir, step: int, extra_state: dict, total_limit: int | None) -> Path:
    """Write `checkpoint-<step>` atomically: everything goes to a temp folder that is renamed when complete."""
    from safetensors.torch import save_file

    from .pipeline_adni_ldm import share_like_other_files

    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with writing(tmp, f"checkpoint {step}"):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's random_states_<i>.pkl is in tmp before the rename
    if accelerator.is_main_process:
        tensors = {k: v.detach().contiguous().cpu() for k, v in extra_state.get("tensors", {}).items()}
        with writing(tmp, f"checkpoint {step}"):
            if tensors:
                save_file(tensors, str(tmp / "training_state.safetensors"))
            meta = {"step": step, **extra_state.get("meta", {})}
            (tmp / "training_state.json").write_text(json.dumps(meta, indent=2))
            share_like_other_files(tmp.rglob("*.safetensors"))
            fsync_tree(tmp)
        # this step again (resumed from an earlier checkpoint): the old checkpoint-N goes aside in one rename (a
        # checkpoint-N.old.tmp, which the next start removes), never half-deleted
        replace_folder(tmp, final)
        if total_limit is not None:
            # never the one just saved: resumed from an older checkpoint, newer ones (of the abandoned run) outrank it
            others = [p for p in list_checkpoints(output_dir) if p != final]
            for old in others[:max(0, len(others) - (total_limit - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info("saved %s", final)
    return final


def save_into(output_dir: Path, save, last: str | None = None) -> None:
    """`save(folder)` into a temporary folder in `output_dir`, then each file and folder it wrote swapped in
    (`last` at the end: what marks the save as whole, e.g. model_index.json). A save cut short (a full disk, a
    job's time limit) in place left half-written weights beside the earlier model's configs: a folder that no
    longer loads, or worse, loads and looks finished. Cut short here, each part is the old one or the new one."""
    output_dir = Path(output_dir)
    tmp = output_dir / ".saving.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(output_dir, "the final model"):
        save(tmp)
    from .pipeline_adni_ldm import share_like_other_files

    share_like_other_files(tmp.rglob("*.safetensors"))
    for part in sorted(tmp.iterdir(), key=lambda q: q.name == last):
        target = output_dir / part.name
        if part.is_dir():  # (a link to another folder in its place: the link goes, not its files)
            replace_folder(part, target)
        else:
            os.replace(part, target)
    shutil.rmtree(tmp, ignore_errors=True)


def forget_earlier_results(output_dir, *names: str) -> None:
    """Before the final model replaces an earlier one in `output_dir` (a run trained on from a finished one):
    that model's results (`names`) and generated card go first, so that a run cut short in its final saves never
    leaves them beside the new weights as if they were its own. A README.md without the marker line is kept."""
    from .model_card import CARD_FILE, is_generated_card

    output_dir = Path(output_dir)
    for name in names:
        (output_dir / name).unlink(missing_ok=True)
    card = output_dir / CARD_FILE
    if card.is_file() and is_generated_card(card.read_text(encoding="utf-8", errors="replace")):
        card.unlink()


def find_resume_checkpoint(args) -> Path | None:
    """The checkpoint --resume_from_checkpoint names (`latest`: the newest whole one in --output_dir), or None.
    Silent: a run looks several times; `_start_stage` says once that `latest` found none."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args.output_dir)
        return found[-1] if found else None
    return Path(args.resume_from_checkpoint)


def _check_random_states_loaded(path: Path, process_index: int) -> None:
    """accelerate's load_state goes on without a checkpoint's random states it cannot read (a damaged file), saying
    so at INFO on the main process alone: the resume then draws other noise, timesteps and dropout than the
    uninterrupted run would. Said as a warning, by the process concerned. (A process the checkpoint had no file
    for, a resume on more processes, is no exact resume anyway: not warned.)"""
    from accelerate.utils import load

    states = path / f"random_states_{process_index}.pkl"
    if not states.is_file():
        return
    try:
        readable = {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(load(states))
    except Exception:  # what accelerate met too (it catches every exception there)
        readable = False
    if not readable:
        logger.warning("%s could not be read (damaged?): the run goes on from the checkpoint's weights and "
                       "optimizer, but its random numbers (noise, timesteps, dropout) are not the ones an "
                       "uninterrupted run would have drawn", states)


def load_checkpoint(accelerator, path: Path) -> tuple[int, dict, dict]:
    """Restore what `save_checkpoint` wrote. Returns (step, tensors, meta)."""
    import pickle

    from safetensors.torch import load_file

    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as e:
        # torch's weights-only loader refused a file (a checkpoint downloaded or shared, not one this package
        # wrote): its message ends in the advice to load it with weights_only=False, which runs the file's code
        why = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line),
                   str(e).splitlines()[0] if str(e) else type(e).__name__).split(". Please")[0]  # (more advice)
        raise TrainingError(f"--resume_from_checkpoint {path}: a file in it holds more than tensors and numbers "
                            f"({why}), so it was not loaded: it is not a checkpoint this package wrote. Resume "
                            "only from checkpoints your own runs wrote") from None
    except RuntimeError as e:
        # torch's load_state_dict: the checkpoint's weights do not fit the model these flags built. A checkpoint
        # with a run record was compared before (check_resume_model); one from before 2026-12-02 records no flags,
        # and this was a traceback of one "size mismatch" line per tensor
        if not str(e).startswith("Error(s) in loading state_dict"):
            raise
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), "")
        raise TrainingError(f"--resume_from_checkpoint {path}: its weights do not fit the model this run's flags "
                            f"build ({detail.rstrip('.')}); resume with the flags it was trained with (--preset, and "
                            "for the UNet --conditional and the same class folders: the training_args.json of the "
                            "run that wrote it records them), or start a new run in another --output_dir") from None
    _check_random_states_loaded(path, accelerator.process_index)
    meta = json.loads((path / "training_state.json").read_text())
    tensor_file = path / "training_state.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return int(meta["step"]), tensors, meta


# What a run is: a resumed run must train the same model on the same data with the same optimisation, or
# "resume is exact" fails silently (a changed --learning_rate was even overridden by the restored scheduler).
# Each checkpoint records these; the run length, logging, precision, speed and Hub flags may change.
RESUME_MUST_MATCH = ("seed", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "scale_lr",
                     "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay",
                     "adam_epsilon", "max_grad_norm", "use_ema", "ema_max_decay", "ema_inv_gamma", "ema_power",
                     "split", "val_fraction", "split_seed", "preprocess", "patient_ids")


SUBJECT_RULE_SINCE = "2026-12-04"


def run_record(args, stage_flags: tuple[str, ...] = (), identity: dict | None = None,
               num_processes: int | None = None, stage: str | None = None, also_accepted: dict | None = None,
               precision: str | None = None) -> dict:
    """What defines a run (its stage, RESUME_MUST_MATCH and the stage's own flags, its model config and data), in
    the JSON types a checkpoint's training_state.json reads back (tuples become lists). `also_accepted`: per
    identity, older values that name the same thing (a key computed as an older version did)."""
    record = {"stage": stage, "flags": {name: getattr(args, name, None) for name in (*RESUME_MUST_MATCH, *stage_flags)},
              "identity": identity or {}, "num_processes": num_processes, "precision": precision,
              # --patient_ids subject merges a subject named both ways since then (a checkpoint without it: before)
              "subject_rule": SUBJECT_RULE_SINCE}
    if also_accepted:
        record["also_accepted"] = also_accepted
    return json.loads(json.dumps(record))


def resume_mismatches(recorded: dict, current: dict) -> list[str]:
    """What differs between a checkpoint's run record and this run's, one line each."""
    def effective(flags: dict) -> dict:  # no --split_seed is --seed's: "--seed 0" and "--split_seed 0" agree
        flags = {**flags, "split_seed": split_seed(flags)} if "split_seed" in flags else flags
        if flags.get("patient_ids") == "subject-2026-12-03":  # splits as subject unless a subject is named both
            flags = {**flags, "patient_ids": "subject"}  # ways: the data's fingerprint (identity) tells
        if flags.get("use_ema") is False:  # the EMA flags did nothing (a run from before they needed --use_ema)
            flags = {name: value for name, value in flags.items() if name not in EMA_DEFAULTS}
        return flags

    lines = []
    recorded_flags, current_flags = effective(recorded.get("flags", {})), effective(current.get("flags", {}))
    for name, then in recorded_flags.items():
        now = current_flags.get(name, then)
        if now != then:
            lines.append(f"--{name}: {then!r} in the checkpoint, {now!r} now")
    model_config = ("the model config (--preset)" if recorded.get("stage") == "vqmodel"
                    else "the model config (--preset, --conditional, the class folders)")
    identity_names = {"model_config": model_config,
                      "train_data": "the training slices (--train_data_dir, or files in it changed)",
                      "latent_cache_key": "the VQModel or the training slices (--vqmodel, --train_data_dir)",
                      "vqmodel": "the VQModel (--vqmodel: its config and weights; trained on since, or another)"}
    for name, then in recorded.get("identity", {}).items():
        now = current.get("identity", {}).get(name, then)
        if now != then and then not in current.get("also_accepted", {}).get(name, []):
            lines.append(f"{identity_names.get(name, name)}: not those of the checkpoint"
                         + (_older_split_hint(recorded, current)
                            if name in ("train_data", "latent_cache_key") else ""))
    return lines


def _older_split_hint(recorded: dict, current: dict) -> str:
    """Which --patient_ids splits as a checkpoint from before today's rules did, where the names say it may."""
    recorded_flags, current_flags = recorded.get("flags", {}), current.get("flags", {})
    if "patient_ids" not in recorded_flags:
        return (" (a checkpoint from before 2026-12-03: if the file names hold ADNI or BIDS subject ids, or a slice is "
                "in both train/ and test/, --patient_ids file splits as it did)")
    then, now = recorded_flags["patient_ids"], current_flags.get("patient_ids")
    if then == now == "subject" and "subject_rule" not in recorded:
        then = "subject-2026-12-03"  # "subject" before 2026-12-04
        when = "a checkpoint from before 2026-12-04: "
    else:
        when = ""
    if then != now and {then, now} <= {"subject", "subject-2026-12-03"}:
        return (f" ({when}if the file names name a subject both ways, 002_S_0295 and sub-ADNI002S0295, or hold ADNI4's "
                f"five-digit ids, --patient_ids {then} splits as it did)")
    return ""


def check_resume_matches(path: Path, current: dict) -> int | None:
    """Refuse to resume `path` with another run's flags, model or data (before any state is loaded); only warn
    when the number of processes changed (a requeued job on other GPUs): the batches then differ.
    Returns the number of processes that wrote the checkpoint (None when it does not say)."""
    state = path / "training_state.json"
    if not state.is_file():
        return None  # not a checkpoint: check_checkpoint_files says so
    try:
        recorded = json.loads(state.read_text(encoding="utf-8")).get("run")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None  # damaged: check_checkpoint_whole says so
    if recorded is None:  # written before 2026-12-02: nothing to compare
        return None
    then, now = recorded.get("stage"), current.get("stage")  # no stage: written before 2026-12-03
    if then and now and then != now:  # else the other stage's flags would be listed as if they were this run's
        raise TrainingError(f"--resume_from_checkpoint {path}: a checkpoint of {STAGE_SCRIPTS.get(then, then)}, not "
                            f"of {STAGE_SCRIPTS.get(now, now)}; train into another --output_dir")
    mismatches = resume_mismatches(recorded, current)
    if mismatches:
        raise TrainingError(
            f"--resume_from_checkpoint {path} belongs to another run:\n  " + "\n  ".join(mismatches)
            + "\nResume with the checkpoint's values, or start a new run in another --output_dir")
    then, now = recorded.get("num_processes"), current.get("num_processes")
    if then is not None and now is not None and then != now:
        logger.warning("resuming %s on %d process(es); it was written by %d: the global batch and the data order now "
                       "differ from an uninterrupted run's", path, now, then)
    precision_then, precision_now = recorded.get("precision"), current.get("precision")
    if precision_then and precision_now and precision_then != precision_now:  # allowed, but not silently
        logger.warning("resuming %s in %s; it was trained in %s (give --mixed_precision %s to keep it; "
                       "`python train_*.py` reads no accelerate config)", path, _precision_name(precision_now),
                       _precision_name(precision_then), precision_then)
    return then


def _precision_name(precision: str) -> str:
    return "float32" if precision == "no" else precision


def reposition_lr_schedule(lr_scheduler, args, step: int, then: int, now: int) -> None:
    """A checkpoint written by `then` processes, resumed on `now`: put the LR schedule where an uninterrupted
    run on `now` processes would be at `step`. (A prepared schedule steps once per process per optimizer step,
    so the restored position counts `step * then`; left as it is, the schedule ran `now / then` times too slow
    or too fast.) With --scale_lr the rate is rescaled to the new global batch as well."""
    from torch.optim.lr_scheduler import LambdaLR

    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
    if not isinstance(inner, LambdaLR):  # every diffusers schedule is one; anything else is left alone
        logger.warning("the LR schedule (%s) is not moved for the new number of processes", type(inner).__name__)
        return
    ratio = now / then
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio)}.get(args.scale_lr, 1.0)
    inner.base_lrs = [base * factor for base in inner.base_lrs]
    inner.last_epoch = step * now
    inner._step_count = inner.last_epoch + 1
    for group, lr_lambda, base in zip(inner.optimizer.param_groups, inner.lr_lambdas, inner.base_lrs):
        group["initial_lr"] = base
        group["lr"] = base * lr_lambda(inner.last_epoch)
    inner._last_lr = [group["lr"] for group in inner.optimizer.param_groups]
    logger.warning("the LR schedule is moved to step %d of a run on %d process(es): learning rate now %.3g%s",
                   step, now, inner._last_lr[0], f" (--scale_lr {args.scale_lr}: x{factor:.3g})" if factor != 1 else "")


# ------------------------------------------------------------------------------------------ the run


@dataclass
class EMAState:
    """Wraps diffusers' EMAModel so its shadow weights go into checkpoints as safetensors (no pickle)."""

    ema: object  # diffusers.training_utils.EMAModel

    def tensors(self) -> dict:
        return {f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)}

    def meta(self) -> dict:
        return {"ema_optimization_step": self.ema.optimization_step}

    def restore(self, tensors: dict, meta: dict) -> None:
        for i, p in enumerate(self.ema.shadow_params):
            p.data.copy_(tensors[f"ema.{i}"].to(p.device, p.dtype))
        self.ema.optimization_step = meta["ema_optimization_step"]

    @torch.no_grad()
    def copy_rows(self, model, param: torch.Tensor, rows: torch.Tensor) -> None:
        """Copy `rows` of `param` (a parameter of the `model` the EMA was made for) into the EMA weights. For
        restarted codebook codes: the average would otherwise keep each one between its dead place and its
        new one for thousands of steps, and the EMA model would quantise with codes the encoder no longer uses."""
        index = next(i for i, p in enumerate(model.parameters()) if p is param)
        shadow = self.ema.shadow_params[index]
        shadow[rows] = param[rows].to(shadow)


@contextlib.contextmanager
def weights_to_save(model, ema: EMAState | None):
    """`model` in eval mode holding the weights a save now would keep: the EMA's with --use_ema (the live ones
    are put back after, bit for bit, on their device: EMAModel.store would copy them to the host)."""
    params = list(model.parameters())
    live = [p.detach().clone() for p in params] if ema is not None else []
    was_training = model.training
    try:
        if ema is not None:
            ema.ema.copy_to(params)
        model.eval()
        yield model
    finally:
        model.train(was_training)
        with torch.no_grad():
            for p, kept in zip(params, live):
                p.copy_(kept)


def weights_label(ema: EMAState | None) -> str:
    """Which weights `weights_to_save` puts in the model, for a picture's caption."""
    return "EMA weights" if ema is not None else "training weights (no EMA)"


def loss_scale(accelerator) -> float | torch.Tensor:
    """The fp16 GradScaler's current scale, as a device tensor (no host sync); 1.0 without a scaler (bf16, fp32)."""
    scaler = accelerator.scaler
    if scaler is None:
        return 1.0
    scale = scaler._get_scale_async()  # None until the scaler's first backward
    return scale if scale is not None else scaler.get_scale()


def compiled_graph_count() -> int:
    """Graphs torch.compile (dynamo) has compiled in this process so far."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # a torch without dynamo's counters: nothing to compare
        return 0
    return int(counters["stats"]["unique_graphs"])


def make_ema(model, args, device):
    from diffusers.training_utils import EMAModel

    if not args.use_ema:
        return None
    ema = EMAModel(
        model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
        power=args.ema_power, model_cls=type(model), model_config=model.config,
        foreach=True,  # one fused update over all tensors instead of a Python loop per parameter
    )
    ema.to(device)
    return EMAState(ema)


def median_interval_rate(points: list[tuple[int, float]], images_per_step: int) -> float | None:
    """The median of (steps x images_per_step / seconds) over consecutive (step, time) points; None without an
    interval of at least one step."""
    rates = [(s1 - s0) * images_per_step / (t1 - t0) for (s0, t0), (s1, t1) in zip(points, points[1:])
             if s1 > s0 and t1 > t0]
    if not rates:
        return None
    rates.sort()
    middle = len(rates) // 2
    return round(rates[middle] if len(rates) % 2 else (rates[middle - 1] + rates[middle]) / 2, 2)


class TrainingRun:
    """The bookkeeping around a script's own step: use it as

        run = TrainingRun(args, accelerator, loader, sampler, model, optimizer=optimizer,
                          lr_scheduler=lr_scheduler, ema=ema, stage="UNet")
        for batch in run.batches():
            with accelerator.accumulate(model):
                ... loss ...
            if accelerator.sync_gradients:
                run.end_step({"loss": loss.detach(), ...})
            else:  # gradient accumulation: the step logs the mean over its micro-batches
                run.log_micro_batch({"loss": loss.detach(), ...})
        run.finish()
    """

    _signalled = 0  # the stop signal this process received, if any
    # time.monotonic() of the last loss_curve.png, or of the run's start: a checkpoint draws it once a minute has
    # passed (a run of a few seconds drew it at its first checkpoint and again at its end, 2 s each on a CPU)
    _curve_drawn_at = -math.inf
    _curve_drawn_of = None  # (step, history rows) it drew: the same again is not redrawn
    _signalled_at = 0.0  # when (time.monotonic())
    _stop_agreed = False  # every process knows that one of them received one (at a log flush)
    # (step, wall clock, images trained this session) at each log flush: the steady rate
    _log_points: list[tuple[int, float, int]] | None = None
    # images this session trained on, every process's: an epoch's last step of fewer micro-batches than
    # --gradient_accumulation_steps trains on fewer images than a full one (the rates counted it as full)
    _images_trained = 0
    _plain_log = False  # a plain log line for the bar, where stderr is not a terminal (set by `batches`)
    _plain_logged_at: float | None = None
    _plain_logged_point: tuple | None = None  # the (step, time, images) log point of the last plain line
    # () -> {name: value}: the held-out numbers of the weights a save would keep (main process, every
    # --validation_steps); None without held-out data
    validate = None
    ema: EMAState | None = None  # --use_ema's average (set by __init__)
    _validation: dict[str, float] | None = None  # this step's held-out numbers, for its log row
    _step_lr: float | None = None  # the learning rate of the step in progress (read as its first micro-batch starts)

    def __init__(self, args, accelerator, loader, sampler, model, *, optimizer, ema: EMAState | None = None,
                 stage: str, extra_state=None, restore_extra_state=None, stage_flags: tuple[str, ...] = (),
                 identity: dict | None = None, also_accepted: dict | None = None, lr_scheduler=None,
                 validate=None):
        self.args, self.accelerator, self.loader, self.sampler, self.model = args, accelerator, loader, sampler, model
        self.validate = validate
        self.lr_scheduler = lr_scheduler  # moved on a resume with another number of processes
        # what this run is (flags, model config, data): recorded in every checkpoint, compared on resume
        self.record = run_record(args, stage_flags, identity, accelerator.num_processes,
                                 stage=stage.lower(),  # "UNet" -> "unet": the project name, as start_stage's
                                 also_accepted=also_accepted, precision=precision_in_effect(accelerator))
        self.optimizer = optimizer  # for the learning rate in the logs
        self.ema = ema
        self.stage = stage
        self.extra_state = extra_state or (lambda: {"tensors": {}, "meta": {}})
        self.restore_extra_state = restore_extra_state or (lambda tensors, meta: None)
        self.output_dir = Path(args.output_dir)
        self.steps_per_epoch = steps_per_epoch(loader, args.gradient_accumulation_steps)
        self.max_train_steps = total_train_steps(args, loader)
        self.num_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)
        self.global_step = 0
        self.start_step = 0  # where this process started: 0, or the resumed checkpoint's step
        self._pace_since = time.monotonic()  # the end of this process's first step (the CPU pace warning)
        self.first_epoch = 0
        self._pending: list[dict] = []  # detached loss tensors since the last log: no .item() per step
        self._micro_logs: list[dict] = []  # this step's earlier micro-batches (gradient accumulation)
        self._traced: list[int] = []  # batch indices since the last step (--trace_batches)
        self._micro = self._batches_since_step = 0
        self._weight = 1.0  # this micro-batch's loss weight (`backward`)
        self._last_good_checkpoint: Path | None = None
        self._previous_handlers: dict = {}  # the stop signals' handlers before training (batches), given back after
        self._finishing_announced = False
        self.progress = None
        self.start_time = time.time()
        self._curve_drawn_at = time.monotonic()
        self._graphs_at_start = compiled_graph_count()  # after maybe_compile's probe: training should add none
        self.recompiled_graphs = 0
        warmup = getattr(args, "lr_warmup_steps", 0)
        if warmup and getattr(args, "lr_scheduler", None) == "constant" and accelerator.is_main_process:
            # diffusers' get_scheduler builds "constant" without its num_warmup_steps: the warm-up was dropped
            # without a word (the card said "warm-up steps 100"), the default --lr_warmup_steps included
            logger.warning("--lr_scheduler constant has no warm-up: --lr_warmup_steps %d is not used (the run trains "
                           "at the full learning rate from step 1); --lr_scheduler constant_with_warmup warms up",
                           warmup)
        if warmup >= self.max_train_steps and getattr(args, "lr_scheduler", "constant") != "constant" \
                and accelerator.is_main_process:
            # the optimizer's own rate: --learning_rate as --scale_lr scaled it (the schedule keeps it as initial_lr)
            target = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"]) \
                if optimizer is not None else args.learning_rate
            # step k trains at (k - 1) / warmup of it: the schedule steps after each optimizer step, from 0
            logger.warning("--lr_warmup_steps %d is not below the run's %d steps: the learning rate peaks at %.3g, "
                           "never reaching %g (--learning_rate%s)", warmup, self.max_train_steps,
                           target * (self.max_train_steps - 1) / warmup, target,
                           f" {args.learning_rate:g}, --scale_lr {args.scale_lr}" if getattr(args, "scale_lr", False)
                           else "")

    # -- resume ------------------------------------------------------------------------------------
    def resume(self) -> None:
        path = find_resume_checkpoint(self.args)
        if path is None:
            return
        written_by = check_resume_matches(path, self.record)
        saved_step = int(json.loads((path / "training_state.json").read_text(encoding="utf-8"))["step"])
        if saved_step > self.max_train_steps:  # it re-saved the later model as this shorter run's, without a word
            raise TrainingError(
                f"--resume_from_checkpoint {path} is at step {saved_step}, past this run's {self.max_train_steps} "
                "steps (--max_train_steps, or --num_epochs): give --max_train_steps "
                f"{saved_step} or more to go on, or resume from an earlier checkpoint")
        step, tensors, meta = load_checkpoint(self.accelerator, path)
        now = self.accelerator.num_processes
        if written_by and written_by != now and self.lr_scheduler is not None:
            reposition_lr_schedule(self.lr_scheduler, self.args, step, written_by, now)
        self.start_time = time.time() - float(meta.get("elapsed_seconds", 0.0))
        then_steps = meta.get("max_train_steps")
        if then_steps and then_steps != self.max_train_steps and self.args.lr_scheduler not in CONSTANT_SCHEDULES:
            logger.warning("resuming a run of %d steps as one of %d: the --lr_scheduler %s schedule is laid over the "
                           "new length, so the learning rate jumps at the resume", then_steps, self.max_train_steps,
                           self.args.lr_scheduler)
        if self.ema is not None:
            if "ema.0" not in tensors:
                raise TrainingError(f"{path} holds no EMA weights but --use_ema is set; resume without --use_ema")
            self.ema.restore(tensors, meta)
        self.restore_extra_state(tensors, meta)
        self.global_step = self.start_step = step
        self.first_epoch = step // self.steps_per_epoch
        self._last_good_checkpoint = path
        if self.accelerator.is_main_process:  # every check passed: from here the folder changes (clear_earlier_run)
            from .hub import mark_training_started

            mark_training_started(self.output_dir, STAGE_SCRIPTS.get(self.record.get("stage"), "a training run"))
        self._warn_model_past_checkpoint(path, step)
        self._set_aside_newer_checkpoints(step)
        self._truncate_history(step)
        self._set_aside_evaluation(step)
        logger.info("resumed from %s at step %d (epoch %d)", path, step, self.first_epoch)
        if step >= self.max_train_steps and self.accelerator.is_main_process:  # (a stopped run's final work, again)
            logger.info("step %d is this run's last: nothing left to train; the model is saved, evaluated and "
                        "described again (a larger --max_train_steps or --num_epochs trains on)", step)

    def _warn_model_past_checkpoint(self, path: Path, step: int) -> None:
        """A run from before 2026-12-02 wrote no checkpoint at its last step: its saved model (vqvae/, or the
        pipeline) is past `latest`, and a resume to train on went back to the last checkpoint and replaced that
        model at the end, the steps since then trained again, without a word."""
        if self.args.resume_from_checkpoint != "latest" or not self.accelerator.is_main_process:
            return
        steps = []
        for name in ("train_metrics.json", "metrics.json"):  # the UNet's record, the VQModel's
            try:
                steps.append(int(json.loads((self.output_dir / name).read_text(encoding="utf-8"))["train_steps"]))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
        if steps and max(steps) > step:
            logger.warning("%s holds a model trained to step %d, past its latest checkpoint %s (runs before "
                           "2026-12-02 wrote none at the last step): this run trains steps %d to %d again from "
                           "there, and its model replaces the step-%d one at the end (copy that one elsewhere "
                           "first to keep it)", self.output_dir, max(steps), path.name, step + 1, max(steps),
                           max(steps))

    def _set_aside_evaluation(self, step: int) -> None:
        """A resumed run replaces the model that evaluation/ measured (it trains on, or it finishes an earlier
        checkpoint); its numbers reached the new model's card and push as the new model's. The folder is renamed
        evaluation-of-step-<N>, with a warning. Only the same model finished again keeps it."""
        evaluation = self.output_dir / "evaluation"
        if not (self.accelerator.is_main_process and evaluation.is_dir()):
            return
        try:
            steps = int(json.loads((self.output_dir / "train_metrics.json").read_text())["train_steps"])
        except (OSError, ValueError, KeyError, TypeError):
            steps = "earlier"
        if steps == step == self.max_train_steps:
            return
        aside, k = self.output_dir / f"evaluation-of-step-{steps}", 1
        while aside.exists():
            k += 1
            aside = self.output_dir / f"evaluation-of-step-{steps}-{k}"
        os.replace(evaluation, aside)
        logger.warning("%s measured the model of step %s, which this run replaces: moved to %s (run `adni-diffusers "
                       "evaluate` on the new model)", evaluation, steps, aside.name)

    def _set_aside_newer_checkpoints(self, step: int) -> None:
        """Resuming an earlier checkpoint abandons the later ones of the first attempt: renamed out of `latest`'s
        reach (checkpoint-N.abandoned), or a later `latest` (a requeued job) would go back to that branch."""
        newer = [c for c in list_checkpoints(self.output_dir) if int(CHECKPOINT_RE.match(c.name).group(1)) > step]
        if newer and self.accelerator.is_main_process:
            # the abandoned branch's sample grids too: samples-000030.png stayed beside this run's grids, a picture
            # of a step this run never made
            grids = [p for p in Path(self.output_dir, "samples").glob("*-*.png")
                     if (m := GRID_STEP_RE.fullmatch(p.name)) and int(m.group(1)) > step]
            for c in newer + grids:
                target, n = c.with_name(f"{c.name}.abandoned"), 2
                while target.exists():
                    target, n = c.with_name(f"{c.name}.abandoned-{n}"), n + 1
                c.rename(target)
            logger.warning("resumed at step %d: the later %s renamed to *.abandoned (no longer picked by "
                           "--resume_from_checkpoint latest; delete them when you no longer need them)%s", step,
                           ", ".join(c.name for c in newer),
                           f", and {len(grids)} sample grid(s) of those steps in samples/" if grids else "")
        self.accelerator.wait_for_everyone()

    # -- the loop ----------------------------------------------------------------------------------
    def batches(self):
        from tqdm.auto import tqdm

        args, acc = self.args, self.accelerator
        if acc.is_main_process:  # the numbers a user checks first, as diffusers' examples print them
            per_step = acc.num_processes * args.train_batch_size * args.gradient_accumulation_steps
            logger.info("%s: %d training images; %d process(es) x batch %d x %d accumulated = %d images per step; "
                        "%d steps (%d epoch%s)%s", self.stage, len(self.loader.dataset), acc.num_processes,
                        args.train_batch_size, args.gradient_accumulation_steps, per_step, self.max_train_steps,
                        self.num_epochs, "" if self.num_epochs == 1 else "s",
                        f", from step {self.global_step}" if self.global_step else "")
        # in a log file (a SLURM .out) a plain line every PLAIN_LOG_SECONDS instead of the bar (`flush_logs`)
        terminal = on_a_terminal()
        self._plain_log = acc.is_main_process and not terminal
        self._plain_logged_at = self._plain_logged_point = None
        self.progress = tqdm(
            total=self.max_train_steps, initial=self.global_step, desc=f"{self.stage} steps",
            disable=not acc.is_local_main_process or not terminal, dynamic_ncols=True,
        )
        # a stop signal is noted, not obeyed at once: the processes agree on a step, checkpoint it and stop
        catch = threading.current_thread() is threading.main_thread()
        self._previous_handlers = {s: signal.signal(s, self._on_stop_signal) for s in STOP_SIGNALS} if catch else {}
        finished = False
        redirect = console_logs_above_progress_bars()
        redirect.__enter__()
        try:
            for epoch in range(self.first_epoch, self.num_epochs):
                self.epoch = epoch
                loader = self.loader
                done_in_epoch = self.global_step - epoch * self.steps_per_epoch
                if done_in_epoch > 0:  # resuming mid-epoch: skip the batches already trained on
                    loader = acc.skip_first_batches(self.loader, done_in_epoch * args.gradient_accumulation_steps)
                # Accelerate's loaders re-set the sampler's epoch from their own counter when iterated: set both
                self.sampler.set_epoch(epoch)
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch)
                for position, batch in enumerate(loader, start=max(done_in_epoch, 0) * args.gradient_accumulation_steps):
                    if self.global_step >= self.max_train_steps:  # e.g. resumed from the last step: train no more
                        break
                    self._weight = micro_batch_weight(position, len(self.loader), args.gradient_accumulation_steps)
                    if args.trace_batches:
                        self._traced.extend(batch["index"].tolist())
                    self._micro = self._batches_since_step  # which micro-batch of the step (gradient accumulation)
                    self._batches_since_step += 1
                    # the rate this step trains at, for its log row: once the step ends, the schedule has moved on
                    # to the next step's (a warm-up's last row said a rate above the peak the run ever used)
                    self._step_lr = self._current_lr()
                    yield batch
                if self.global_step >= self.max_train_steps:
                    break
            finished = True
        finally:  # training is over (or failed): its data workers are not needed
            if finished:  # the final save and evaluation follow (final_phase): a stop signal lets them finish
                for signum in self._previous_handlers:
                    signal.signal(signum, self._finish_anyway)
            else:
                self._restore_signal_handlers()
            try:
                stop_loader_workers(self.loader)
                self.progress.close()
            finally:
                redirect.__exit__(None, None, None)

    def _on_stop_signal(self, signum, frame) -> None:
        self._signalled, self._signalled_at = signum, time.monotonic()

    @contextlib.contextmanager
    def final_phase(self):
        """Around the work after the last step (the final model, its evaluation, card and push). A stop signal
        from the last step on (a job scheduler's warning before its time limit) lets that work finish, saying so:
        the training is in the last checkpoint and nothing is left to stop for. Any stop signal again ends the
        run at once, except the same one within REPEATED_SIGNAL_S of the first: that is the same request twice
        (on SLURM every process of the job gets SIGTERM, and torchrun's agent forwards its own to its workers). (`batches` hands the signals over when the loop ends: the last step's sample grid and the
        barrier in `finish` come before this.)"""
        if self._signalled and not self._finishing_announced:  # it came during the last step: noted, not acted on
            self._finish_anyway(self._signalled, None)
        try:
            yield
        finally:
            self._restore_signal_handlers()

    def _finish_anyway(self, signum, frame) -> None:
        global _noted_stop_signal
        if frame is not None:  # it comes now (else it came during the last step, and was noted then)
            self._signalled_at = time.monotonic()
        self._signalled = _noted_stop_signal = signum
        for s in self._previous_handlers:  # a stop signal again ends the run
            signal.signal(s, self._stop_while_finishing)
        self._finishing_announced = True
        if self.accelerator.is_main_process:
            logger.warning("%s after the last training step: finishing the final save and evaluation (the training "
                           "is in %s; if this is cut short, --resume_from_checkpoint latest finishes it). A stop "
                           "signal again stops now.", signal.Signals(signum).name,
                           self._last_good_checkpoint or "no checkpoint")

    def _stop_while_finishing(self, signum, frame) -> None:
        if signum == self._signalled and time.monotonic() - self._signalled_at < REPEATED_SIGNAL_S:
            logger.info("%s again within %.0f s: the same stop request (a launcher forwarding it), the final save "
                        "goes on", signal.Signals(signum).name, REPEATED_SIGNAL_S)
            return
        self._restore_signal_handlers()
        signal.raise_signal(signum)  # what it did before training: by default the process ends

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)

    def _agree_on_stop(self) -> None:
        """Whether any process got a stop signal, agreed by all (one small all-reduce; log flushes do it too)."""
        self._stop_agreed = self._stop_agreed or self.accelerator.reduce(self._stop_flag(), reduction="mean").item() > 0

    def _stop_flag(self) -> torch.Tensor:
        """1 where this process got a stop signal, else 0: a device scalar for an all-reduce."""
        return torch.tensor(float(bool(self._signalled)), device=self.accelerator.device)

    def clip_gradients(self, parameters) -> dict[str, torch.Tensor]:
        """`accelerator.clip_grad_norm_` (call on an optimizer step); returns {"grad_norm": the norm before clipping}
        for the step's logs, a device tensor (no sync). Logged, it also arms the NaN guard against an inf or NaN
        gradient whose loss was finite: clipping turns it into NaN weights, which a checkpoint at that step would
        have kept as "good". Not under fp16, whose GradScaler skips such steps by design."""
        norm = self.accelerator.clip_grad_norm_(parameters, self.args.max_grad_norm)
        if norm is None or self.accelerator.scaler is not None:  # (DeepSpeed returns none)
            return {}
        return {"grad_norm": norm.detach()}

    def backward(self, loss: torch.Tensor) -> None:
        """`accelerator.backward` of this micro-batch's loss, weighted so that an epoch's short last step (fewer
        micro-batches than --gradient_accumulation_steps) gets their mean gradient, not a fraction of it."""
        self.accelerator.backward(loss if self._weight == 1.0 else loss * self._weight)

    def step_generator(self, device=None, shared: bool = False) -> torch.Generator:
        """Randomness for this micro-batch: a pure function of (seed, step, micro-batch, process), so resume
        is exact. `shared=True` gives every process the same stream (for decisions they must agree on)."""
        device = device or self.accelerator.device
        return torch.Generator(device=device).manual_seed(self.step_seed(shared))

    def step_seed(self, shared: bool = False) -> int:
        """The seed of `step_generator`: (seed, step, micro-batch, process)."""
        rank = 0 if shared else self.accelerator.process_index
        # modulo the Generator's seed range (a date-like --seed 20261201 overflowed it at the first step)
        return (((self.args.seed * 1_000_003 + self.global_step) * 1_009 + self._micro) * 1_013 + rank) % 2**64

    def log_micro_batch(self, logs: dict[str, torch.Tensor]) -> None:
        """Call on a micro-batch that does not end the step (gradient accumulation): `end_step` then logs each
        value's mean over the step's micro-batches, not the last micro-batch's alone."""
        self._micro_logs.append(_detached(logs))

    def end_step(self, logs: dict[str, torch.Tensor]) -> None:
        """Call once per optimizer step (when `accelerator.sync_gradients`), with the last micro-batch's logs."""
        # an fp16 step that the grad scaler skipped (inf/NaN gradients) left the weights as they were: the EMA does
        # not count it either (its decay warm-up follows the optimizer's real steps, as the LR schedule does)
        if self.ema is not None and not self.accelerator.optimizer_step_was_skipped:
            self.ema.ema.step(bare_model(self.accelerator, self.model).parameters())
        self.global_step += 1
        self._images_trained += self._batches_since_step * self.args.train_batch_size * self.accelerator.num_processes
        self._batches_since_step = 0
        self.progress.update(1)
        if self.global_step == self.start_step + 1:
            self._check_recompiles()  # early: a recompile shows in the first step
            self._pace_since = time.monotonic()
        elif self.global_step == self.start_step + 1 + CPU_PACE_STEPS:
            self._warn_if_long_on_cpu((time.monotonic() - self._pace_since) / CPU_PACE_STEPS)
        micro_batches, self._micro_logs = self._micro_logs + [_detached(logs)], []
        self._pending.append({k: v.mean(0) for k, v in _stack_per_key(micro_batches, self.accelerator.device).items()})
        if self.args.trace_batches:
            self._write_trace(self._pending[-1])
        validating = self._validation_due()  # the same on every process: each takes part in the flush below
        if validating and self.accelerator.is_main_process:  # the others wait at the next step's all-reduce
            self._validation = self._run_validation()
        if validating or self.global_step % self.args.logging_steps == 0 or self.global_step == self.max_train_steps:
            self.flush_logs()
        # and at the last step: a failure in the final evaluation or save loses no training, and a finished run
        # can be trained on (--resume_from_checkpoint latest with a larger --max_train_steps)
        saved = self.global_step % self.args.checkpointing_steps == 0 or self.global_step == self.max_train_steps
        if saved:
            self.checkpoint()
            self._agree_on_stop()  # a signal during the save: stop on this checkpoint, not --logging_steps later
        if self._signalled and self.accelerator.num_processes == 1:
            self._stop_agreed = True  # alone, nothing to agree on: this step, not the next log flush (less margin)
        # a stop signal: this step's checkpoint, then out (run_cli says where to go on). Not at the last step: the
        # final save and evaluation are all that is left, and final_phase lets them finish
        if self._stop_agreed and self.global_step < self.max_train_steps:
            path = self._last_good_checkpoint if saved else self.checkpoint()
            if self.accelerator.is_main_process:  # the stopped run's curve, whenever the last was drawn
                self.plot_loss_curve()
            raise TrainingStopped(self._signalled, self.global_step, path)

    def _validation_due(self) -> bool:
        every = getattr(self.args, "validation_steps", 0)
        return self.validate is not None and every > 0 and (
            self.global_step % every == 0 or self.global_step == self.max_train_steps)

    def _run_validation(self) -> dict[str, float]:
        started = time.monotonic()
        values = {k: float(v) for k, v in self.validate().items()}
        logger.info("step %d: %s (held-out, %.1f s)", self.global_step,
                    ", ".join(f"{k} {v:.4g}" for k, v in values.items()), time.monotonic() - started)
        return values

    def _write_trace(self, step_logs: dict) -> None:
        """--trace_batches (for tests and debugging; a host sync per step): this process's batch indices, its
        own loss and a checksum of its weights, one row per step in trace/rank-<i>.jsonl."""
        acc = self.accelerator
        params = bare_model(acc, self.model).parameters()
        checksum = float(sum(p.detach().double().sum() for p in params))
        path = self.output_dir / "trace" / f"rank-{acc.process_index}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": self.global_step, "rank": acc.process_index, "world_size": acc.num_processes,
                                "indices": self._traced, "weights_checksum": checksum,
                                "loss": float(step_logs["loss"]) if "loss" in step_logs else None}) + "\n")
        self._traced = []

    def flush_logs(self) -> dict[str, float]:
        """Average the pending logs (one host sync), stop on NaN/inf, write tensorboard + history."""
        if not self._pending:
            return {}
        stacked = _stack_per_key(self._pending, self.accelerator.device)
        self._pending = []
        # each key's mean here, then the mean over every process (each saw its own shard) in one all-reduce, so
        # every process sees the same NaN/inf; a NaN or inf in any step's value makes its mean non-finite. The
        # last entry: whether this process got a stop signal (nonzero on any process: every process stops here)
        local_means = torch.stack([v.float().mean() for v in stacked.values()]
                                  + [self._stop_flag()])
        *values, stop = self.accelerator.reduce(local_means, reduction="mean").tolist()
        if self._log_points is None:
            self._log_points = []  # (a class default of None: a list there would be shared by every run)
        # after the sync: the steps' work is done
        self._log_points.append((self.global_step, time.time(), self._images_trained))
        self._stop_agreed = self._stop_agreed or stop > 0
        means = dict(zip(stacked, values))
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            where = self._last_good_checkpoint or "no checkpoint yet"
            error = TrainingError(
                f"non-finite {', '.join(bad)} at step {self.global_step}: training stopped. The last good "
                f"checkpoint is {where}. Try a lower --learning_rate, --mixed_precision bf16 instead of fp16, "
                "or a smaller --max_grad_norm."
            )
            error.every_process = True  # the all-reduced means: every process stops here with these words
            raise error
        # the rate the logged step trained at (the optimizer's now is the next step's)
        means["lr"] = self._current_lr() if self._step_lr is None else self._step_lr
        if self.ema is not None:  # the decay its warm-up has reached (as diffusers' training examples log it)
            means["ema_decay"] = float(self.ema.ema.get_decay(self.ema.ema.optimization_step))
        means.update(self._validation or {})  # this step's held-out numbers (main process), in its row
        self._validation = None
        self.accelerator.log(means, step=self.global_step)
        self.progress.set_postfix({k: f"{v:.4g}" for k, v in means.items() if k in ("loss", "lr", "rec_loss")})
        if self._plain_log:
            self._log_plain_line(means)
        if self.accelerator.is_main_process:
            history = self.output_dir / HISTORY_FILE
            history.parent.mkdir(parents=True, exist_ok=True)
            with open(history, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.global_step, "time": round(time.time() - self.start_time, 2),
                                    **means}) + "\n")
        return means

    def _log_plain_line(self, means: dict[str, float]) -> None:
        """The bar's news as a log line, where stderr is not a terminal: at the first log, every PLAIN_LOG_SECONDS
        and at the last step. The pace is over the time since the previous plain line (the checkpoints, held-out
        numbers and sample grids in it count as time, in their share): over the last interval between logs alone
        (--logging_steps), a line whose interval held a checkpoint said 5.7 images/s and 20 min left where the
        30 s before it ran at 26.6 and 5 min were left, and the lines between checkpoints left them out."""
        now = time.monotonic()
        due = self._plain_logged_at is None or now - self._plain_logged_at >= PLAIN_LOG_SECONDS
        if not due and self.global_step < self.max_train_steps:
            return
        self._plain_logged_at = now
        pace = ""
        points = self._log_points or []
        last, first = (points[-1], self._plain_logged_point) if points else (None, None)
        self._plain_logged_point = last
        if first is not None and last[0] > first[0] and last[1] > first[1]:
            seconds = last[1] - first[1]
            seconds_per_step = seconds / (last[0] - first[0])
            left = (self.max_train_steps - self.global_step) * seconds_per_step
            pace = (f", {(last[2] - first[2]) / seconds:.4g} images/s"
                    + (f", about {_duration(left)} left" if left > 0 else ""))
        shown = ", ".join(f"{k} {v:.4g}" for k, v in means.items() if not k.startswith("val_"))
        logger.info("%s step %d/%d (%d%%): %s%s", self.stage, self.global_step, self.max_train_steps,
                    100 * self.global_step // max(self.max_train_steps, 1), shown, pace)

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def checkpoint(self) -> Path:
        self.flush_logs()  # never save weights that came from a non-finite loss
        state = self.extra_state()
        tensors, meta = dict(state.get("tensors", {})), dict(state.get("meta", {}))
        if self.ema is not None:
            tensors.update(self.ema.tensors())
            meta.update(self.ema.meta())
        meta["epoch"] = self.global_step // self.steps_per_epoch
        meta["max_train_steps"] = self.max_train_steps
        meta["elapsed_seconds"] = round(time.time() - self.start_time, 2)  # the history's clock goes on after a resume
        meta["run"] = self.record
        path = save_checkpoint(self.accelerator, self.output_dir, self.global_step, {"tensors": tensors, "meta": meta},
                               self.args.checkpoints_total_limit)
        self._last_good_checkpoint = path
        if self.accelerator.is_main_process and time.monotonic() - self._curve_drawn_at >= LOSS_CURVE_EVERY_S:
            self.plot_loss_curve()  # a curve to open while the run goes on, not only at its end
        if self.accelerator.is_main_process and getattr(self.args, "push_checkpoints", False):
            from .hub import push_from_args

            push_from_args(self.args, path, self.output_dir, step=self.global_step)
        return path

    def _truncate_history(self, step: int) -> None:
        """After a resume, forget logged (and traced) steps past the checkpoint: they will be trained again."""
        files = [self.output_dir / "trace" / f"rank-{self.accelerator.process_index}.jsonl"]  # each rank its own
        if self.accelerator.is_main_process:
            files.append(self.output_dir / HISTORY_FILE)
        for path in files:
            if path.exists():
                rows = [r for r in read_jsonl(path) if r.get("step", step + 1) <= step]
                write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))

    def images_per_second(self, seconds: float) -> float | None:
        """Images trained per second of this run's wall clock (all processes, accumulation included; the periodic
        sample grids, logs and checkpoints count as time too: a whole-run rate, not a step rate). None when this run
        trained no step (resumed at its last step, to finish the save): there is no rate, not a rate of 0."""
        images = self._images_trained  # (not steps x a full step's images: an epoch's last step may be short)
        if self.global_step == self.start_step or images == 0:
            return None
        return round(images / max(seconds, 1e-9), 2)

    def steady_images_per_second(self) -> float | None:
        """Images per second between logs (every --logging_steps), the median over this run's intervals: the
        training speed without the first step's compilation, the checkpoints and the sample grids, which
        `images_per_second` counts (over a 300-step H200 run, 2026-12-04: 4,490 steady against 2,612 whole)."""
        return median_interval_rate([(images, t) for _, t, images in self._log_points or []], 1)

    def history(self) -> list[dict]:
        history = self.output_dir / HISTORY_FILE
        return read_jsonl(history) if history.exists() else []

    def _warn_if_long_on_cpu(self, seconds_per_step: float) -> None:
        acc = self.accelerator
        steps_left = self.max_train_steps - self.global_step
        if acc.device.type != "cpu" or not acc.is_main_process or seconds_per_step * steps_left <= LONG_CPU_RUN_S:
            return
        logger.warning("on the CPU: the %d steps left take about %.1f h at the pace of the steps so far (%.1f s per "
                       "step: --preset %s, batch %d). To try the commands, give --max_train_steps (e.g. 20) or "
                       "--preset small, as `adni-diffusers demo` does on a CPU", steps_left,
                       seconds_per_step * steps_left / 3600, seconds_per_step, getattr(self.args, "preset", "?"),
                       self.args.train_batch_size)

    def _check_recompiles(self) -> None:
        """torch.compile compiles again when a step's inputs differ from the probe's in a way its guards see (a
        memory format, a dtype, a shape): minutes per compile on a GPU, silently. Say so once it happens;
        `recompiled_graphs` goes into the stage's metrics."""
        new = compiled_graph_count() - self._graphs_at_start
        if new > self.recompiled_graphs:
            logger.warning("torch.compile compiled %d more graph(s) during training, after the compiled probe step; "
                           "each costs a compile (minutes on a GPU). TORCH_LOGS=recompiles names the input that "
                           "changed.", new)
        self.recompiled_graphs = new

    def plot_loss_curve(self) -> None:
        """loss_curve.png from logs/history.jsonl (main process): at checkpoints (at most every LOSS_CURVE_EVERY_S),
        at a stop and at the end."""
        from .plots import plot_loss_curves

        rows = self.history()
        if self._curve_drawn_of == (self.global_step, len(rows)):  # a stop or the end right after a checkpoint's
            return
        self._curve_drawn_at, self._curve_drawn_of = time.monotonic(), (self.global_step, len(rows))
        try:
            if rows:
                # the run's folder in the title: a sweep's curves side by side are told apart
                plot_loss_curves(rows, self.output_dir / "loss_curve.png",
                                 title=f"{self.stage} training: {Path(self.output_dir).resolve().name}")
        except (ValueError, RuntimeError, OSError) as e:  # a picture: never the reason a run stops
            logger.warning("loss_curve.png not drawn: %s", e)

    def finish(self) -> None:
        self._check_recompiles()
        self.flush_logs()
        if self.accelerator.is_main_process:
            self.plot_loss_curve()
        self.accelerator.wait_for_everyone()

    def log_final_metrics(self, metrics: dict, names) -> None:
        """The finished model's held-out numbers (`names` of `metrics`) into tensorboard at the last step, as
        `final/<name>` beside the training curves (they were in the metrics file alone)."""
        values = {f"final/{k}": float(metrics[k]) for k in names if isinstance(metrics.get(k), (int, float))
                  and not isinstance(metrics[k], bool) and math.isfinite(metrics[k])}
        if values:
            self.accelerator.log(values, step=self.global_step)


def _duration(seconds: float) -> str:
    """"2 h 05 min", "3 min 20 s", "40 s": a time left, as a reader takes it in."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def _detached(logs: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v)) for k, v in logs.items()}


def _stack_per_key(rows: list[dict], device) -> dict[str, torch.Tensor]:
    """Each key's values stacked over the rows that have it, in first-seen order: some keys come only on some
    steps (a codebook restart, the GAN terms from --disc_start on), and each is averaged over those alone."""
    keys = dict.fromkeys(k for row in rows for k in row)
    return {k: torch.stack([row[k].to(device) for row in rows if k in row]) for k in keys}


def precision_in_effect(accelerator) -> str:
    """The precision the run really trains in: Accelerate keeps "fp16" as its setting on the CPU, where it has no
    fp16 autocast and trains in float32 ("no")."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        return "no"
    return accelerator.mixed_precision


# Recorded per session, not settings it trained with: an earlier session differing in them changed nothing.
SESSION_RECORDS = ("resume_from_checkpoint", "compile_seconds", "started_at_step", "earlier_sessions")


def earlier_sessions(record_path: Path, now: dict) -> list[dict]:
    """The sessions before this one (resumed at `now["started_at_step"]`), oldest first, from the run's
    training_args.json: each with the step it started at and the settings it ran with where they differ from
    `now`'s. A resume keeps what RESUME_MUST_MATCH names, but precision, process count, compilation and run length
    may change, and the file is rewritten by every session: without this it described the last one alone.
    Sessions that started at or after this one's step are left out: their steps were replaced (a resume from an
    earlier checkpoint) or there were none (a finished run finished again)."""
    try:
        before = json.loads(Path(record_path).read_text())
    except (OSError, ValueError):  # none, or not ours: nothing to carry on
        return []
    if not isinstance(before, dict):
        return []
    now_step, sessions = now.get("started_at_step") or 0, []
    # each entry keeps only its differences from the record it was written into: rebuilt whole, then compared
    recorded = [s for s in before.get("earlier_sessions") or [] if isinstance(s, dict)]
    for session in [*recorded, {"started_at_step": before.get("started_at_step")}]:
        settings = {**before, **(session.get("changed") if isinstance(session.get("changed"), dict) else {})}
        changed = {k: v for k, v in settings.items() if k not in SESSION_RECORDS and now.get(k) != v}
        if "mixed_precision" in changed:  # what it trained in, even where the same as now (None: not recorded)
            changed["mixed_precision_used"] = settings.get("mixed_precision_used")
        sessions.append({"started_at_step": session.get("started_at_step"), "changed": changed})
    return [s for s in sessions if not isinstance(s["started_at_step"], int) or s["started_at_step"] < now_step]


def save_run_info(output_dir, args, data, data_source: str, extra: dict | None = None, model=None,
                  accelerator=None, start_step: int = 0, default_batch: int | None = None) -> None:
    """`training_data.json` (what the model saw; read by the Hub push and the model card) and
    `training_args.json` (the flags, and with `model` whether it really trains compiled: `--compile` falls
    back to eager when the compiled step fails; with `accelerator` the precision it trains in, which a missing
    --mixed_precision leaves to `accelerate config`, the number of processes and the global batch, and with the
    stage's `default_batch` too the learning rate --scale_lr made of --learning_rate: a methods section copied
    from the flags alone gave the wrong rate). A session resumed at `start_step` keeps the earlier sessions'
    differing settings (`earlier_sessions`)."""
    output_dir = Path(output_dir)
    info = {"source": data_source, **data.summary(), **(extra or {})}
    if data_source == "demo" and info.get("root"):  # the build's seed and size: to rebuild the same data
        from .data import demo_build_settings

        if (settings := demo_build_settings(info["root"])) is not None:
            info["demo_data"] = settings
    if data.split == "patient":  # what drew the held-out patients: evaluate redraws them from this file alone too
        info.update(val_fraction=args.val_fraction, split_seed=split_seed(args))
    # whole or not at all: a resume or evaluate reads them back, and a kill mid-write left JSON they refused
    write_text_atomically(output_dir / "training_data.json", json.dumps(info, indent=2))
    safe_args = {k: v for k, v in vars(args).items() if "token" not in k}
    if model is not None:
        from accelerate.utils.other import is_compiled_module

        safe_args["compiled"] = is_compiled_module(model)
    if accelerator is not None:
        from .environment import environment

        safe_args["mixed_precision_used"] = precision_in_effect(accelerator)
        safe_args["num_processes"] = accelerator.num_processes
        safe_args["global_batch_size"] = (args.train_batch_size * args.gradient_accumulation_steps
                                          * accelerator.num_processes)
        if default_batch is not None:  # the peak rate, after the warm-up (make_optimizer's)
            safe_args["learning_rate_used"] = scaled_learning_rate(args, accelerator.num_processes, default_batch)
        safe_args["environment"] = environment(accelerator.device)
    safe_args["started_at_step"] = start_step
    record = output_dir / "training_args.json"
    if start_step:  # a resume: the file so far is the earlier sessions' (a fresh run's old one is not)
        now = json.loads(json.dumps(safe_args, default=str))  # as it reads back: tuples as lists, paths as text
        safe_args["earlier_sessions"] = earlier_sessions(record, now)
    write_text_atomically(record, json.dumps(safe_args, indent=2, default=str))


def start_logging(accelerator, args, project: str, start_step: int = 0) -> None:
    """Tensorboard (with the run's flags, tokens left out) on the main process. A run resumed at `start_step`
    drops the events logged after it by the first attempt (they would show twice: steps 1, 2, 3, 4, 3, 4).
    The flags the run started with go into its own tensorboard folder (a resume's changes are in
    training_args.json; TensorBoard shows a run's first flags only): Accelerate's `config=` put them in a new folder
    named by the time (`logs/<project>/1764982311.52/`), which TensorBoard listed as another run at every start."""
    if accelerator.is_main_process:
        # a flag left at None ("what accelerate config says", "off") is a value too: "None", not left out
        flags = {k: "None" if v is None else v for k, v in vars(args).items()
                 if (v is None or isinstance(v, (int, float, str, bool))) and "token" not in k}
        init_kwargs = {"tensorboard": {"purge_step": start_step + 1}} if start_step else {}
        folder = Path(accelerator.logging_dir or ".") / project
        if not start_step and "tensorboard" in [getattr(t, "value", t) for t in accelerator.log_with] \
                and any(folder.glob("events.out.tfevents.*")):
            # a fresh run into a --logging_dir that is never cleared (outside --output_dir), whose subfolder of this
            # --output_dir's path holds an earlier run's events: its curves read 1, 2, 3, 1, 2, 3. TensorBoard hides
            # them from here on (the files stay)
            logger.warning("--logging_dir: %s holds an earlier run's tensorboard events (an earlier run into this "
                           "--output_dir, or an attempt of this run that stopped before its first checkpoint); "
                           "TensorBoard hides them now (their files stay). To compare runs, give each its own "
                           "--output_dir", folder)
            init_kwargs = {"tensorboard": {"purge_step": 0}}
        accelerator.init_trackers(project, init_kwargs=init_kwargs)
        from torch.utils.tensorboard.summary import hparams

        for tracker in accelerator.trackers:
            if tracker.name != "tensorboard":  # wandb, comet, ...: their run config, as init_trackers(config=) gives it
                tracker.store_init_configuration(flags)
            elif not start_step:
                # this run's flags, not the experiment's columns (add_hparams writes those too): TensorBoard takes
                # the first run's columns it finds for a whole --logdir, with every flag marked "same in all runs"
                # and None flags typed as text, so a sweep's table opened on adam_beta1 instead of the swept flag.
                # Without them it works the columns out from all the runs (which flags differ; the runs' scalars)
                _, session_start, session_end = hparams(flags, {})  # what SummaryWriter.add_hparams writes
                for summary in (session_start, session_end):
                    tracker.writer.file_writer.add_summary(summary)
                tracker.writer.flush()


def log_image_grid(accelerator, tag: str, images: torch.Tensor, step: int, path, nrow: int,
                   row_titles: list[str] | None = None, caption: str | None = None,
                   col_titles: list[str] | None = None) -> Path:
    """A grid of images in [-1, 1] as a PNG at `path` and, when tensorboard is on, as an image there; with a title
    left of each row, above each column and a caption above when given."""
    import numpy as np

    from .plots import save_picture, titled_grid

    grid = titled_grid(images, nrow, row_titles, caption, col_titles)
    path = save_picture(grid, path)  # whole or not at all: a resume never writes this step's grid again
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(grid)[None], step)
    return path


# what a collective raises when a peer process has exited (gloo; NCCL when it notices instead of waiting out
# --ddp_timeout)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited")
# what a collective raises when the other processes did not come within --ddp_timeout (gloo; NCCL's watchdog)
PEER_LATE = ("Timed out waiting", "Watchdog caught collective operation timeout")


def out_of_memory(error: BaseException) -> bool:
    """A device's out-of-memory error (torch.OutOfMemoryError), or the CPU allocator's ("DefaultCPUAllocator: can't
    allocate memory"): a raw torch traceback that says nothing of the flags that lower the memory."""
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(error, oom)) or "can't allocate memory" in str(error) \
        or "out of memory" in str(error).lower()


# the work outside the training step (no gradients) that an out-of-memory error can come from, by function name,
# and the flag that lowers its memory there: --train_batch_size does not
OUT_OF_MEMORY_ELSEWHERE = {
    "load_or_build": ("encoding the latent cache", "--eval_batch_size"),
    "_validation_loss": ("the held-out loss", "--eval_batch_size"),
    "_sample_grid": ("a sample grid", "--num_sample_images (one batch a class)"),
    "reconstruct_and_measure": ("the held-out reconstruction metrics", "--eval_batch_size"),
    "latent_statistics": ("the scaling factor's statistics", "--eval_batch_size"),
    "code_usage": ("the codebook usage", "--eval_batch_size"),
}


def out_of_memory_advice(error: BaseException) -> str:
    """What to lower after an out-of-memory `error`: the flag of the work it came from (its traceback's innermost
    function named in OUT_OF_MEMORY_ELSEWHERE), else the training step's."""
    import traceback

    names = [frame.f_code.co_name for frame, _ in traceback.walk_tb(error.__traceback__)]
    for name in reversed(names):
        if name in OUT_OF_MEMORY_ELSEWHERE:
            what, flag = OUT_OF_MEMORY_ELSEWHERE[name]
            return f"out of memory in {what} (the error below): lower {flag}"
    return ("out of memory (the error below): lower --train_batch_size (--gradient_accumulation_steps N keeps the "
            "batch: N smaller batches a step) or use a smaller --preset (`small` is the CPU demo's)")


def run_cli(script: str, parse_args, main, argv=None) -> int:
    """Parse, run, and turn a TrainingError into one line on stderr and exit status 2 (Ctrl-C: 130, saying
    where the run can go on from).

    Called from Python with `argv` (a notebook's sweep over `cli([...])`), Ctrl-C says the same line and is then
    raised again, so that the sweep stops rather than going on to its next run."""
    import sys

    args = None
    rank = _rank()
    try:
        # the flags are the same on every process: argparse's usage and error (or a TrainingError of the flags)
        # once, from the main process, not once per process
        import io

        said = io.StringIO()
        try:
            with alike_on_every_process(), \
                    contextlib.redirect_stderr(said) if rank > 0 else contextlib.nullcontext():
                args = parse_args(argv)
        except SystemExit as e:  # argparse's usage error: as a TrainingError below, the main process says it; left
            # at once, this one could have the launcher stop the main process before it had (then no word at all)
            if rank > 0 and e.code not in (0, None) and not _main_process_ends_within(MAIN_PROCESS_ERROR_WAIT_S):
                sys.stderr.write(said.getvalue())
            raise
        result = main(args)
    except TrainingError as e:
        # an error every process meets is the main process's to print: the others stop with the same status,
        # quietly, once it has ended (the launcher then stops them), or print it themselves if it does not end
        if rank == 0 or not e.every_process or not _main_process_ends_within(MAIN_PROCESS_ERROR_WAIT_S):
            print(f"{script}: error: {e}", file=sys.stderr)
        remove_unused_output_dir(args)
        return 2
    except TrainingStopped as e:
        if rank == 0:
            print(f"{script}: {e}", file=sys.stderr)
        return 128 + (e.signum or signal.SIGTERM)  # as if the signal had ended it, for a job scheduler's records
    except KeyboardInterrupt:
        if rank == 0:  # every process gets the Ctrl-C; one line is enough
            where = _where_to_go_on(args) or "no checkpoint had been written (see --checkpointing_steps)"
            print(f"{script}: interrupted; {where}", file=sys.stderr)
        if argv is not None:
            raise
        return 130
    except OSError:  # a full disk, a quota, a folder gone: the traceback says what; this says what is safe
        if rank == 0 and (where := _where_to_go_on(args)):
            print(f"{script}: stopped by the error below; {where} once it is fixed", file=sys.stderr)
        raise
    except RuntimeError as e:
        # another process ended (its own error printed above) while this one waited in a collective: one line,
        # not a 40-line traceback of the barrier that saw the connection close
        if any(text in str(e) for text in PEER_GONE):
            if rank > 0:
                print(f"{script}: process {rank} stopped: another process ended (see its error above)",
                      file=sys.stderr)
            else:  # one that printed nothing: killed (the OOM killer, kill -9, a lost node) or crashed in C++
                where = _where_to_go_on(args) or "no checkpoint had been written (see --checkpointing_steps)"
                peer_gone = str(e).splitlines()[0].split(". This is typically")[0]  # gloo's words, less its advice
                print(f"{script}: stopped: another process ended (its error, if any, is above; the launcher's "
                      f"summary below gives its exit code): {peer_gone}; {where}", file=sys.stderr)
            return 2
        if any(text in str(e) for text in PEER_LATE):
            # a barrier or all-reduce that waited --ddp_timeout: gloo's one-line reason under a 25-line traceback
            # named no flag, and the main process, stopped by the launcher, took that for a scheduler's SIGTERM
            timeout = getattr(args, "ddp_timeout", None)
            waited = "--ddp_timeout" + (f" {timeout} s" if timeout else "")
            where = _where_to_go_on(args) or "no checkpoint had been written (see --checkpointing_steps)"
            print(f"{script}: process {rank} stopped: it waited {waited} for another process, which did not come (the "
                  "main process builds the latent cache, validates, samples, evaluates and pushes while the others "
                  f"wait: if that takes longer, raise --ddp_timeout; else a process hung); {where}", file=sys.stderr)
            return 2
        if rank == 0 and out_of_memory(e):
            where = _where_to_go_on(args) or "no checkpoint had been written (see --checkpointing_steps)"
            print(f"{script}: {out_of_memory_advice(e)}; {where}", file=sys.stderr)
        raise
    finally:
        OUTPUT_DIRS_MADE.clear()  # this run's; the next run in this process makes its own
        FINISHED_OUTPUT_DIRS.clear()
    if result:
        print(json.dumps(result, indent=2))
    return 0


# how long a process other than the main one waits for the main process to stop with the error they share
MAIN_PROCESS_ERROR_WAIT_S = 30.0


def _main_process_ends_within(seconds: float) -> bool:
    """In a process other than the main one, stopped by an error every process meets: whether the main process
    ended within `seconds`, as the SIGTERM that torchrun sends the other processes once one has failed says. This
    one printing nothing and leaving at once would have the launcher stop the main process before its own line."""
    if threading.current_thread() is not threading.main_thread():
        return False
    ended = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: ended.append(signum))
    try:
        deadline = time.monotonic() + seconds
        while not ended and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return bool(ended)


# the --output_dir of this process's runs that reached their clean end (push_if_asked): a later error (another
# process gone at the last barrier) must not send the user back to a checkpoint older than the finished model
FINISHED_OUTPUT_DIRS: set[str] = set()


def _where_to_go_on(args) -> str | None:
    if str(getattr(args, "output_dir", None)) in FINISHED_OUTPUT_DIRS:
        return f"this run had finished: its model in {args.output_dir} is complete (its final save and card written)"
    try:
        checkpoints = list_checkpoints(args.output_dir) if getattr(args, "output_dir", None) else []
    except OSError:
        return None
    return (f"the last checkpoint is {checkpoints[-1]}: go on from it with --resume_from_checkpoint latest"
            if checkpoints else None)


def push_if_asked(accelerator, args) -> None:
    """The run's clean end (both scripts call it last, on the main process, after the final save and card): the
    folder is one model again, so clear_earlier_run's in-progress marker goes. Then --push_to_hub: push the finished
    model. On failure the model is already saved: the error says how to push it later."""
    from .hub import HubError, mark_training_finished, push_from_args

    mark_training_finished(args.output_dir)  # before the push, which refuses a marked folder
    FINISHED_OUTPUT_DIRS.add(str(args.output_dir))
    if not getattr(args, "push_to_hub", False):
        return

    try:
        push_from_args(args, args.output_dir)
    except HubError as e:
        accelerator.end_training()
        raise TrainingError(str(e)) from None
