"""Progress that reads well in a terminal and in a log file (a SLURM `.out`, `> run.log 2>&1`).

tqdm redraws its bar up to 10 times a second with a carriage return: in a terminal one line that moves, in a file
one line that grows for the whole run (a 48-second training run wrote a 20,796-character line, the loss readable
only inside it). Where stderr is not a terminal, bars redraw every LOG_FILE_BAR_SECONDS, and training writes a
plain log line instead of its bar (`training.TrainingRun`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys

LOG_FILE_BAR_SECONDS = 30.0  # a bar's redraws in a log file: one every 30 s, not ten a second


def on_a_terminal(stream=None) -> bool:
    """Whether `stream` (default stderr, where tqdm and the logs write) is a terminal."""
    stream = sys.stderr if stream is None else stream
    if type(stream).__module__.startswith("ipykernel"):  # a notebook's stderr: no tty, but its bars draw in place
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress_bar(iterable=None, **kwargs):
    """tqdm's bar (`tqdm.auto`), redrawn every LOG_FILE_BAR_SECONDS where stderr is not a terminal."""
    from tqdm.auto import tqdm

    if not on_a_terminal():
        kwargs.setdefault("mininterval", LOG_FILE_BAR_SECONDS)
        # and a check at every update: tqdm's monitor thread otherwise redraws every 10 s an iterable's count
        # from its last check (300/700 at 30 s, 300/700 again at 50 s)
        kwargs.setdefault("miniters", 1)
        # a file cannot blank a line: each draw its own line, and the last one kept (how long the stage took)
        kwargs["file"] = LogFileLines(kwargs.get("file") or sys.stderr)
        kwargs["leave"] = True
    return tqdm(iterable, **kwargs)


class LogFileLines:
    """A bar's stream in a log file: each draw a line of its own, without tqdm's carriage returns and blankings.
    (With them, a stage's draws, the bars after it and the next log line all shared one physical line: an
    `evaluate --ablations` log had 9 bars, their redraws and an INFO line on one 2,000-character line.) tqdm's
    logging redirect does not blank such a bar before a log line: the line is not on the bar's."""

    _CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|[\r\n]")  # returns, newlines, cursor moves (nested bars)

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = self._CONTROL.sub("", text).rstrip()
        if line:  # (a blanking, or the newline after the last draw: nothing to write)
            if self.stream is sys.stderr:  # what was printed before the bar, before it (tqdm does so too)
                sys.stdout.flush()
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # encoding, isatty, fileno...: the stream's
        return getattr(self.stream, name)


def console_logs_above_progress_bars():
    """Log lines (a checkpoint saved, a warning) written above tqdm's bar, not glued to the end of its line: tqdm's
    redirect, for the loggers that print to the console (the root's, from logging.basicConfig, and diffusers' own,
    which does not propagate). A logger without a console handler (a notebook's or a test's own set-up) is left as
    it is: the redirect would add one."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    def prints_to_console(logger):
        consoles = (sys.stdout, sys.stderr)
        return any(isinstance(h, logging.StreamHandler) and h.stream in consoles for h in logger.handlers)

    loggers = [lg for lg in (logging.root, logging.getLogger("diffusers")) if prints_to_console(lg)]
    return logging_redirect_tqdm(loggers=loggers) if loggers else contextlib.nullcontext()
