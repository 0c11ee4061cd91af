"""The `adni-diffusers` command: one sub-command per module, imported only when it runs.

Each module named in COMMANDS provides `add_arguments(parser)` and `main(args) -> int | None`.
"""

from __future__ import annotations

import argparse
import copy
import errno
import importlib
import logging
import os
import select
import sys
from pathlib import Path

COMMANDS = {
    "demo-data": ("adni_diffusers.demo_data", "build the synthetic MNI152-based stand-in for ADNI's AD_NC folder"),
    "demo": ("adni_diffusers.demo", "the whole job: demo data, VQModel, UNet, pipeline, samples"),
    "generate": ("adni_diffusers.generate", "sample slices from a saved pipeline (folder or Hub repo)"),
    "push": ("adni_diffusers.hub", "push a saved pipeline folder to the Hugging Face Hub"),
    "evaluate": ("adni_diffusers.evaluate", "realism, diversity, class fidelity and memorisation of a model"),
    "counterfactual": ("adni_diffusers.counterfactual", "turn a real slice toward another class (NC to AD, say) and map the change"),
    "held-out": ("adni_diffusers.held_out", "list the slices a trained model never saw (its held-out patients')"),
    "export": ("adni_diffusers.export", "save a train_unet.py checkpoint (checkpoint-<step>) as a pipeline folder"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help with each option's default, unless its help already says it or it is an on/off flag."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._shows_default(action):  # argparse prints no help line for help=None
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return action.default not in (None, argparse.SUPPRESS) and action.nargs != 0 and bool(action.option_strings)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not self._shows_default(action) or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"


def tolerate_any_character(stream) -> None:
    """A character the stream's encoding lacks is replaced, not an error: on Windows, output redirected to a file
    or job log is in the locale's code page (cp1252), without the arrows and minus signs of the tables printed
    at the end of hours of work (counterfactual's crashed there, before writing its numbers)."""
    if hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="replace")


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for `ls | head -1`'s ls


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it: its write end then polls as an error (POLLERR)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(mask & select.POLLERR for _, mask in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file behind it (a test's capture), or no poll (Windows)
        return False


# what to do once there is room again, by command (the others: run it again)
AGAIN_WITH_ROOM = {"generate": "run it again with --resume: the images written are kept",
                   "demo": "run the same command again: it goes on from its checkpoints"}


def _out_of_room_advice(name: str, args, error: BaseException) -> str:
    """For a full disk, a quota or a read-only folder: where the command was writing, the room there, what next.
    ("[Errno 28] No space left on device" named neither the folder nor the way on.)"""
    from .files import DISK_FULL_ERRNOS, free_space

    if not isinstance(error, OSError) or error.errno not in DISK_FULL_ERRNOS:
        return ""
    out = getattr(args, "out", None)
    if out is None and name == "evaluate":
        out = Path(args.model) / "evaluation"  # its default
    if error.errno == errno.EROFS:  # no room to make there
        return f": {'--out ' + str(out) if out else 'the folder'} is on a read-only file system: write elsewhere"
    where = f"; --out {out} has {free_space(out)} free" if out else ""
    again = AGAIN_WITH_ROOM.get(name, "run it again")
    if name == "generate" and not (out and (Path(out) / "generation.json").is_file()):
        again = "run it again"  # stopped before its record: nothing to go on with (--resume would be refused)
    return f"{where}: make room (or write elsewhere) and {again}"


def _what_an_interrupt_left(name: str, args) -> str:
    """evaluate's partial results, or generate's images so far, where an interrupted run left them (the line said
    "interrupted" alone): said where the run's record is marked incomplete, not where it is missing or whole."""
    from .files import read_json_object

    if name == "generate":
        out = Path(args.out)
        record, left = out / "generation.json", (f"the images made so far are in {out} (generation.json: complete "
                                                 "false): the same command with --resume makes the rest")
    elif name == "evaluate":
        out = Path(args.out) if getattr(args, "out", None) else Path(args.model) / "evaluation"
        record, left = out / "metrics.json", (f"{out / 'metrics.json'} and report.md hold what was measured so far, "
                                              "marked incomplete; a rerun samples again (the feature net is cached)")
    else:
        return ""
    return f"; {left}" if read_json_object(record).get("complete") is False else ""


def main(argv: list[str] | None = None) -> int:
    given_argv = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import __version__

    parser = argparse.ArgumentParser(prog="adni-diffusers", formatter_class=HelpFormatter,
                                     description="Latent diffusion for brain MRI slices (ADNI AD / NC): demo data, "
                                                 "sampling, evaluation, counterfactuals and Hub upload. Training: "
                                                 "accelerate launch -m adni_diffusers.train_vqmodel / -m "
                                                 "adni_diffusers.train_unet (in a checkout also train_vqmodel.py / "
                                                 "train_unet.py).")
    parser.add_argument("--version", action="version", version=f"adni-diffusers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])  # prints help or the argparse error, then exits
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    command_parser = argparse.ArgumentParser(prog=f"adni-diffusers {name}", description=help_text,
                                             formatter_class=HelpFormatter)
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    if (copies := _copies_of_one_process_command(name)) is not None:
        return copies
    from .files import expand_home
    from .training import keeps_session_logging

    expand_home(args)  # --out=~/samples: the shell leaves "~" after "=" as it is

    # a notebook's own logging set-up is given back afterwards (`cli.main([...])` left its root logger at INFO)
    return keeps_session_logging(_run_command)(name, module, args, from_python=given_argv)


def _copies_of_one_process_command(name: str) -> int | None:
    """Exit status 2 where `accelerate launch --num_processes N` (or torchrun), or `srun -n N` / `mpirun -np N`,
    started N copies of a one-process command (generate, evaluate, ...): each did the whole job on the same device
    (cuda, i.e. GPU 0) into the same --out, the other GPUs idle and the files written N times at once. (An
    sbatch script's bare `srun adni-diffusers evaluate ...` starts one copy per task of the job.) None where the
    command may run. Every command is one process: the demo's stages too train in its one process (under a launcher
    every process built the data, took the other's recipe for a run cut short, and the second stage died in gloo's
    rendezvous); several processes train with `accelerate launch train_*.py`."""
    from .training import LAUNCHER_TASK_COUNTS

    counts = [("WORLD_SIZE", "RANK", "a launcher (accelerate launch, torchrun)")]
    counts += [(count, rank, "srun or mpirun") for count, rank in zip(LAUNCHER_TASK_COUNTS, LAUNCHER_TASK_RANKS)]
    for count, rank, launcher in counts:
        value = os.environ.get(count, "").strip()
        if not value.isdigit() or int(value) <= 1:
            continue
        if os.environ.get(rank, "0").strip() in ("", "0"):  # one line, not one per process
            print(f"adni-diffusers {name}: error: {count}={value}: {launcher} started {value} copies of this "
                  "one-process command, each of which would do the whole job on the same device and write the same "
                  f"files; run `adni-diffusers {name} ...` once, without the launcher (srun -n 1; on a GPU of your "
                  "choice: --device cuda:N where the command has --device)"
                  + ("" if count == "WORLD_SIZE" else f"; if one copy alone runs (a shell that inherited {count}, "
                     f"an interactive job's), unset {count}"), file=sys.stderr)
        else:  # the launcher stops the others once the first has failed: let the main process say it first
            import time

            time.sleep(2)
        return 2
    return None


# each copy's number, beside LAUNCHER_TASK_COUNTS' names of how many copies there are
LAUNCHER_TASK_RANKS = ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def _run_command(name: str, module, args: argparse.Namespace, from_python: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tolerate_any_character(sys.stdout)
    from .progress import console_logs_above_progress_bars
    from .training import TrainingStopped

    try:
        with console_logs_above_progress_bars():  # evaluate's log lines were glued to the end of its bars
            code = int(module.main(args) or 0)
        sys.stdout.flush()  # a reader gone (`| head`) shows here, not as an error while Python exits
        return code
    except BrokenPipeError as e:  # `held-out ... | head -3`: the reader has what it wanted. Quiet, as a Unix tool
        if not _stdout_reader_gone():  # another pipe broke (a child process's): an error like any other
            print(f"adni-diffusers {name}: error: {e}", file=sys.stderr)
            return 2
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's own flush would fail again)
        return SIGPIPE_EXIT
    except TrainingStopped as e:  # the demo's training got SIGTERM / SIGUSR1: checkpointed, a rerun resumes it
        print(f"adni-diffusers {name}: {e} (`adni-diffusers {name}` with the same flags does)", file=sys.stderr)
        return 128 + (e.signum or 15)
    except (ValueError, OSError, RuntimeError) as e:  # DataError, TrainingError, HubError are among these
        print(f"adni-diffusers {name}: error: {e}{_out_of_room_advice(name, args, e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; what was written so far stays
        print(f"adni-diffusers {name}: interrupted{_what_an_interrupt_left(name, args)}", file=sys.stderr)
        if from_python:  # `cli.main([...])` in a notebook's loop: the loop stops, as Ctrl-C stops any Python call
            raise
        return 130


if __name__ == "__main__":
    sys.exit(main())
