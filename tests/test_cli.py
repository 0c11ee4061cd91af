"""The `adni-diffusers` command line: help, and how a command's failure reaches the user."""

from __future__ import annotations

import sys

import pytest


def test_cli_without_a_command_prints_the_help(capsys):
    """`adni-diffusers` alone shows the usage and the commands, as --help does."""
    from adni_diffusers import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: adni-diffusers" in out and "counterfactual" in out


def test_cli_turns_a_runtime_error_into_one_line_and_status_2(monkeypatch, capsys):
    """A TrainingError or HubError (RuntimeErrors) in a command: one line on stderr, exit status 2."""
    from adni_diffusers import cli, generate
    from adni_diffusers.training import TrainingError

    def failing(args):
        raise TrainingError("the reason")

    monkeypatch.setattr(generate, "main", failing)
    code = cli.main(["generate", "--model", "m", "--out", "o"])
    assert code == 2 and capsys.readouterr().err.strip() == "adni-diffusers generate: error: the reason"


def test_a_full_disk_says_where_and_what_next(monkeypatch, capsys, tmp_path):
    """"[Errno 28] No space left on device" alone named neither the folder nor the way on (generate keeps the images
    written: --resume; evaluate has a default --out)."""
    import errno

    from adni_diffusers import cli, evaluate, generate

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(generate, "main", full)
    monkeypatch.setattr(evaluate, "main", full)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "generation.json").write_text("{}")  # the run's record: --resume goes on with it
    assert cli.main(["generate", "--model", "m", "--out", str(tmp_path / "samples")]) == 2
    err = capsys.readouterr().err
    assert f"No space left on device; --out {tmp_path / 'samples'} has " in err and " free: make room (or write " \
        "elsewhere) and run it again with --resume: the images written are kept" in err, err
    # stopped before its record was written: --resume would be refused ("no run to go on with there")
    (tmp_path / "samples" / "generation.json").unlink()
    assert cli.main(["generate", "--model", "m", "--out", str(tmp_path / "samples")]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith("free: make room (or write elsewhere) and run it again") and "--resume" not in err
    # a read-only file system has no room to make
    monkeypatch.setattr(generate, "main", lambda args: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")))
    assert cli.main(["generate", "--model", "m", "--out", str(tmp_path / "samples")]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith(f"Read-only file system: --out {tmp_path / 'samples'} is on a read-only file "
                                 "system: write elsewhere"), err
    assert cli.main(["evaluate", "--model", str(tmp_path / "ldm")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'ldm' / 'evaluation'} has " in err and "and run it again\n" in err, err


class _Parsed(Exception):
    """Raised in place of parse_args: carries the parser a command built."""


def _options_of_every_command(monkeypatch) -> set[str]:
    """The option strings of the training scripts, every `adni-diffusers` command and the benchmark scripts."""
    import argparse
    import re

    from conftest import REPO_ROOT

    from adni_diffusers import cli, train_unet, train_vqmodel

    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    parsers = []
    for build in [train_vqmodel.parse_args, train_unet.parse_args] + [
            (lambda name=name: cli.main([name])) for name in cli.COMMANDS]:
        with pytest.raises(_Parsed) as parsed:
            build()
        parsers.append(parsed.value.args[0])
    options = {s for p in parsers for action in p._actions for s in action.option_strings}
    for script in (REPO_ROOT / "benchmarks").glob("*.py"):  # scripts, not importable modules: their source
        options |= set(re.findall(r"add_argument\(\s*['\"](--[\w-]+)", script.read_text()))
    return options


def test_every_flag_the_docs_name_exists(monkeypatch):
    """A flag renamed in the code but not in README.md, docs/, benchmarks/ or the model card would send users to an
    argparse error. Every `--flag` there is an option of one of our commands (or of accelerate, pip or tar)."""
    import re

    from conftest import REPO_ROOT

    options = _options_of_every_command(monkeypatch)
    assert {"--train_data_dir", "--vqmodel", "--num-samples", "--subjects", "--vq-preset"} <= options
    others = {"--num_processes", "--multi_gpu", "--mixed_precision", "--config_file",  # accelerate launch
              "--main_process_port", "--cpu", "--num_machines", "--machine_rank", "--main_process_ip", "--dynamo_backend",
              "--mpirun_hostfile",
              "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target",  # pip
              "--exclude",  # tar
              "--dependency",  # sbatch
              "--logdir", "--local-dir"}  # tensorboard, hf download
    docs = [REPO_ROOT / "README.md", REPO_ROOT / "pipeline_card.md", *(REPO_ROOT / "docs").glob("*.md"),
            *(REPO_ROOT / "adni_diffusers").glob("*.md"), *(REPO_ROOT / "benchmarks").glob("*.md")]
    unknown = set()
    for doc in docs:
        for flag, star in re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)(\*?)", doc.read_text()):
            known = any(o.startswith(flag) for o in options) if star else flag in options or flag in others
            if not known:
                unknown.add(f"{doc.relative_to(REPO_ROOT)}: {flag}{star}")
    assert not unknown, sorted(unknown)


def test_output_in_a_code_page_without_arrows_replaces_them_instead_of_failing():
    """Windows writes redirected output in the locale's code page: counterfactual's table (with \u2192 and \u2212)
    crashed its run after all the sampling."""
    import io

    from adni_diffusers.cli import tolerate_any_character

    stream = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    with pytest.raises(UnicodeEncodeError):
        print("AD \u2192 NC", file=stream)
    tolerate_any_character(stream)
    print("AD \u2192 NC", file=stream)
    stream.flush()
    assert stream.buffer.getvalue() == b"AD ? NC\n"


def test_every_text_file_the_package_writes_names_its_encoding():
    """Without encoding=, Windows writes text in its code page: counterfactual's tradeoff.md (arrows, minus signs)
    raised after the measurement and left its numbers unwritten. JSON (json.dumps escapes to ASCII) is exempt."""
    import ast
    from pathlib import Path

    import adni_diffusers

    missing = []
    for path in Path(adni_diffusers.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "write_text":
                arg = node.args[0] if node.args else None
                if not (arg is not None and "json.dumps(" in ast.unparse(arg) and "ensure_ascii" not in ast.unparse(arg)):
                    missing.append(f"{path.name}:{node.lineno}")
            elif name == "open" and isinstance(func, ast.Name) and len(node.args) > 1:
                mode = node.args[1]
                if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and "b" not in mode.value \
                        and set(mode.value) & set("wa+"):
                    missing.append(f"{path.name}:{node.lineno}")
    assert not missing, missing


# --- mutation audit 2026-12-05 (small modules)


def _fake_command(monkeypatch, main=lambda args: None, add_arguments=lambda parser: None):
    """`adni-diffusers fake`: a command whose module is made here (cli imports a command's module when it runs)."""
    import sys
    import types

    from adni_diffusers import cli

    module = types.ModuleType("adni_diffusers_fake_command")
    module.add_arguments, module.main = add_arguments, main
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", (module.__name__, "a command made by the test"))
    return cli


def test_a_commands_help_shows_each_options_default_once(monkeypatch, capsys):
    """Options with a value show their default (also those without help text); on/off flags, options without a
    default, positionals and help that names its default already do not get another."""
    def add_arguments(parser):
        parser.add_argument("out", nargs="?", default="positional_default_kept_quiet", help="where to write")
        parser.add_argument("--steps", type=int, default=50, help="sampling steps")
        parser.add_argument("--scale", type=float, default=2.5)
        parser.add_argument("--fast", action="store_true", help="go fast")
        parser.add_argument("--note", default=None, help="a note")
        parser.add_argument("--seed", type=int, default=7, help="Default: the seed of the model's training run")

    cli = _fake_command(monkeypatch, add_arguments=add_arguments)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fake", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    assert exit_info.value.code == 0 and help_text.startswith("usage: adni-diffusers fake")
    assert "sampling steps (default: 50)" in help_text and "--scale SCALE default: 2.5" in help_text
    assert help_text.lower().count("default") == 3  # --steps, --scale and --seed's own words
    assert help_text.endswith("--seed SEED Default: the seed of the model's training run")  # no "(default: 7)"


@pytest.mark.parametrize("outcome, status, message", [
    (None, 0, ""),
    (3, 3, ""),
    (OSError(28, "No space left on device"), 2, "adni-diffusers fake: error: [Errno 28] No space left on device: "
                                                "make room (or write elsewhere) and run it again"),
    (ValueError("--scale must be positive"), 2, "adni-diffusers fake: error: --scale must be positive"),
    (KeyboardInterrupt(), 130, "adni-diffusers fake: interrupted"),
    ("SIGUSR1", 138, "adni-diffusers fake: stopped by SIGUSR1 at step 4; ck is written: go on from it with "
                     "--resume_from_checkpoint latest (`adni-diffusers fake` with the same flags does)"),
    ("another process's signal", 143, "adni-diffusers fake: stopped by a stop signal (on another process) at step 4; "
     "ck is written: go on from it with --resume_from_checkpoint latest "
     "(`adni-diffusers fake` with the same flags does)"),
])
def test_a_commands_outcome_is_its_exit_status_and_one_line(monkeypatch, capsys, outcome, status, message):
    """What a command returns is the exit status (None is success); a failure the user can act on is one line on
    stderr and status 2; Ctrl-C is 130; a training stopped by a signal is 128 + the signal's number (SIGUSR1, a
    cluster's warning before its time limit, as well as SIGTERM; 143, SIGTERM's, where another process got it)."""
    import signal

    from adni_diffusers.training import TrainingStopped

    def main(args):
        assert args.steps == 5  # the command's own flags, parsed
        if isinstance(outcome, str):
            raise TrainingStopped(signal.SIGUSR1 if outcome == "SIGUSR1" else None, 4, "ck")
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    cli = _fake_command(monkeypatch, main, lambda parser: parser.add_argument("--steps", type=int))
    monkeypatch.setattr(sys, "argv", ["adni-diffusers", "fake", "--steps", "5"])  # as the console script runs it
    assert cli.main() == status
    assert capsys.readouterr().err.strip() == message


def test_ctrl_c_stops_a_python_callers_loop(monkeypatch, capsys):
    """A notebook's sweep `for s in seeds: cli.main([...])` went on to its next run after Ctrl-C (130 returned):
    from Python the interrupt says its line and is raised again, as Ctrl-C stops any Python call."""
    def main(args):
        raise KeyboardInterrupt

    cli = _fake_command(monkeypatch, main, lambda parser: parser.add_argument("--steps", type=int))
    with pytest.raises(KeyboardInterrupt):
        cli.main(["fake", "--steps", "5"])
    assert capsys.readouterr().err.strip() == "adni-diffusers fake: interrupted"


def test_an_unknown_command_is_an_argparse_error_naming_it(capsys):
    from adni_diffusers import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["genrate", "--model", "m"])
    assert exit_info.value.code == 2 and "invalid choice: 'genrate'" in capsys.readouterr().err


def test_a_commands_progress_reaches_the_terminal():
    """The commands report progress with logging.info (hours of sampling or training): the command line shows INFO
    records on stderr, and prints what the stream's encoding lacks as '?' (tolerate_any_character on stdout)."""
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    script = ("import sys, types, logging\n"
              "from adni_diffusers import cli\n"
              "m = types.ModuleType('fake')\n"
              "m.add_arguments = lambda parser: None\n"
              "def main(args):\n"
              "    logging.getLogger('adni_diffusers.fake').info('step 3 of 10')\n"
              "    print('AD \\u2192 NC')\n"
              "m.main = main\n"
              "sys.modules['fake'] = m\n"
              "cli.COMMANDS['fake'] = ('fake', 'a command made by the test')\n"
              "sys.exit(cli.main(['fake']))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert "INFO adni_diffusers.fake: step 3 of 10" in done.stderr.decode() and done.stdout == b"AD ? NC\n"


def test_the_feature_net_cache_flag_has_one_name_in_both_commands():
    """evaluate called it --feature-cache, counterfactual --feature-net-cache (the same folder): each takes both."""
    import argparse

    from adni_diffusers import counterfactual, evaluate

    for module, dest in ((evaluate, "feature_cache"), (counterfactual, "feature_net_cache")):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        for flag in ("--feature-cache", "--feature-net-cache"):
            args = parser.parse_args(["--model", "m", "--to", "AD", "--out", "o", flag, "cache"]
                                     if module is counterfactual else ["--model", "m", flag, "cache"])
            assert getattr(args, dest) == "cache", (module.__name__, flag)


def test_every_option_of_every_command_and_training_script_says_what_it_does():
    """`train_unet.py --help` listed --output_dir, --checkpoints_total_limit, --seed and 15 more by name alone (a
    walkthrough could not tell that --checkpoints_total_limit keeps every checkpoint by default)."""
    import argparse
    import importlib

    from adni_diffusers import cli, train_unet, train_vqmodel

    parsers = {}
    for name, (module_name, _) in cli.COMMANDS.items():
        parsers[f"adni-diffusers {name}"] = parser = argparse.ArgumentParser()
        importlib.import_module(module_name).add_arguments(parser)
    for script in (train_unet, train_vqmodel):
        captured = {}

        def capture(self, args=None, namespace=None, _captured=captured):  # the script's own parser, whole
            _captured["parser"] = self
            raise SystemExit(0)

        original = argparse.ArgumentParser.parse_args
        argparse.ArgumentParser.parse_args = capture
        try:
            with pytest.raises(SystemExit):
                script.parse_args([])
        finally:
            argparse.ArgumentParser.parse_args = original
        parsers[script.__name__] = captured["parser"]
    silent = [f"{where} {action.option_strings[0]}" for where, parser in parsers.items()
              for action in parser._actions
              if action.option_strings and action.help != argparse.SUPPRESS and not (action.help or "").strip()]
    assert silent == []
    assert len(parsers) == len(cli.COMMANDS) + 2 and all(len(p._actions) > 3 for p in parsers.values())


def test_a_commands_log_lines_go_above_its_progress_bars(monkeypatch):
    """`evaluate` glued each log line onto the end of its bar ("... epoch=1, loss=1.267]INFO adni_diffusers..."):
    training sent its log lines through tqdm, the commands did not."""
    import logging
    import sys

    seen = []
    cli = _fake_command(monkeypatch, main=lambda args: seen.append(
        [type(h).__name__ for h in logging.getLogger().handlers]))
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler(sys.stderr)])  # basicConfig's
    assert cli.main(["fake"]) == 0
    assert seen == [["_TqdmLoggingHandler"]]
    assert [type(h).__name__ for h in logging.getLogger().handlers] == ["StreamHandler"]  # as it was, after


def _shell_commands(text: str) -> list[list[str]]:
    """The commands of ```bash blocks (and of a script): continuation lines joined, `&&`, `|` and `;` split,
    `$VAR` and `$((...))` read as 1, a leading `VAR=value` and `srun bash -c "..."` unwrapped."""
    import re
    import shlex

    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        line = re.sub(r"\$\(\([^)]*\)\)|\\?\$\{?\w+\}?", "1", line)
        line = re.sub(r"\[(--[^]]+)\]", r"\1", line)  # an optional flag shown as [--ablations]
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        command = []
        for word in [*words, ";"]:
            if word in ("&&", "||", "|", ";"):
                while command and re.fullmatch(r"\w+=\S*", command[0]):
                    command = command[1:]
                if command[:2] == ["srun", "bash"] and command[2:3] == ["-c"]:
                    commands += _shell_commands(command[3])
                elif command:
                    commands.append(command)
                command = []
            else:
                command.append(word)
    return commands


def test_every_command_in_the_docs_parses_with_its_own_command(monkeypatch):
    """`test_every_flag_the_docs_name_exists` finds a flag in any of our parsers: a flag moved to another command, or
    a value a choice no longer has, went through. Each command line of the docs' bash blocks and the SLURM script is
    parsed here by its own command's parser (argparse alone: no data, no model)."""
    import argparse
    import re

    from conftest import REPO_ROOT

    from adni_diffusers import cli, train_unet, train_vqmodel

    real_parse = argparse.ArgumentParser.parse_args
    parsers = {}

    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        for name, build in [("train_vqmodel.py", train_vqmodel.parse_args), ("train_unet.py", train_unet.parse_args),
                            *((f"adni-diffusers {c}", lambda c=c: cli.main([c])) for c in cli.COMMANDS)]:
            with pytest.raises(_Parsed) as parsed:
                build()
            parsers[name] = parsed.value.args[0]

    def parser_and_args(words: list[str]):
        if words[:2] == ["accelerate", "launch"]:  # accelerate's own options up to the script
            scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
            return parser_and_args(words[scripts[0]:]) if scripts else (None, [])
        if words[:3] == ["python", "-m", "adni_diffusers.cli"]:
            words = ["adni-diffusers", *words[3:]]
        if words[:1] == ["python"] and len(words) > 1 and words[1].endswith(".py"):
            words = words[1:]
        if words[:1] == ["adni-diffusers"] and len(words) > 1:
            return parsers.get(f"adni-diffusers {words[1]}"), words[2:]
        return parsers.get(words[0].rsplit("/", 1)[-1]), words[1:]

    docs = [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").rglob("*.md")]
    checked, failed = 0, []
    for doc in docs:
        blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", doc.read_text(), flags=re.S)
        for words in (w for block in blocks for w in _shell_commands(block)):
            parser, args = parser_and_args(words)
            if parser is None:
                continue
            try:
                real_parse(parser, args)
                checked += 1
            except SystemExit:
                failed.append(f"{doc.relative_to(REPO_ROOT)}: {' '.join(words)}")
    for script in (REPO_ROOT / "docs" / "slurm").glob("*.sbatch"):
        for words in _shell_commands(script.read_text()):
            parser, args = parser_and_args(words)
            if parser is not None:
                try:
                    real_parse(parser, args)
                    checked += 1
                except SystemExit:
                    failed.append(f"{script.relative_to(REPO_ROOT)}: {' '.join(words)}")
    assert not failed, failed
    assert checked >= 30, checked  # (the extraction found the docs' commands)


def test_the_slurm_script_runs_one_job_of_its_name_at_a_time():
    """A run sees another run training into its --output_dir only on its own host (.training_in_progress): the
    sbatch file submitted twice started the second job on other nodes, which resumed the first's checkpoint and
    trained beside it (reproduced: history.jsonl steps 20, 24, 22, 26, 24, 28, 26, 30; each job deleted the other's
    checkpoints). `--dependency=singleton` makes the second job wait for the first."""
    import re

    from conftest import REPO_ROOT

    for script in (REPO_ROOT / "docs" / "slurm").glob("*.sbatch"):
        directives = re.findall(r"^#SBATCH\s+(\S+)", script.read_text(), flags=re.M)
        assert "--dependency=singleton" in directives, script


def test_the_slurm_script_starts_one_process_per_gpu_it_was_given():
    """GPUS_PER_NODE was a number of its own beside `#SBATCH --gpus-per-node=4`: with --gpus-per-node=8 (edited or
    given to sbatch) the job started 4 processes a node and left 4 GPUs idle without a word (nothing checks the
    process count against the GPUs). It is what Slurm gave the batch step."""
    import re
    import subprocess

    from conftest import REPO_ROOT

    for script in (REPO_ROOT / "docs" / "slurm").glob("*.sbatch"):
        line = re.search(r"^GPUS_PER_NODE=.*$", script.read_text(), flags=re.M).group(0)
        out = subprocess.run(["bash", "-c", f'{line}\necho "$GPUS_PER_NODE"'], capture_output=True, text=True,
                             env={"SLURM_GPUS_ON_NODE": "8", "PATH": "/usr/bin:/bin"}, check=True).stdout
        assert out.strip() == "8", (script, line)


def test_the_slurm_scripts_port_is_not_an_ephemeral_one():
    """MAIN_PORT was 20000 + job id % 20000: for 36% of job ids a port of Linux's ephemeral range (32768-60999, its
    default ip_local_port_range), which any outgoing connection of the first node may hold at that moment: the
    rendezvous then fails with "address already in use"."""
    import re
    import subprocess

    from conftest import REPO_ROOT

    for script in (REPO_ROOT / "docs" / "slurm").glob("*.sbatch"):
        line = re.search(r"^MAIN_PORT=.*$", script.read_text(), flags=re.M).group(0)
        for job_id in (1, 12767, 12768, 19999, 31999, 987654321):
            out = subprocess.run(["bash", "-c", f'{line}\necho "$MAIN_PORT"'], capture_output=True, text=True,
                                 env={"SLURM_JOB_ID": str(job_id), "PATH": "/usr/bin:/bin"}, check=True).stdout
            assert 1024 <= int(out) < 32768, (job_id, out, line)


def test_a_command_called_from_python_leaves_the_sessions_logging_as_it_was(monkeypatch):
    """`cli.main([...])` from a notebook left the root logger at INFO with a console handler of its own: every
    INFO line of the user's own loggers and of every library printed from then on (the training scripts' `main`
    gives the session its set-up back already: training.keeps_session_logging)."""
    import logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # a notebook's: no handler, level WARNING
    monkeypatch.setattr(root, "level", logging.WARNING)
    seen = []
    cli = _fake_command(monkeypatch, main=lambda args: seen.append((len(root.handlers), root.level)))
    assert cli.main(["fake"]) == 0
    assert seen == [(1, logging.INFO)]  # the command's own lines show while it runs
    assert root.handlers == [] and root.level == logging.WARNING

    def failing(args):
        raise ValueError("refused")

    cli = _fake_command(monkeypatch, main=failing)
    assert cli.main(["fake"]) == 2
    assert root.handlers == [] and root.level == logging.WARNING


def test_the_help_names_a_training_command_a_pip_install_has(capsys):
    """A wheel holds the package alone: `accelerate launch train_vqmodel.py`, all the help named, is a file only a
    checkout has; `-m adni_diffusers.train_vqmodel` runs the same stage from either."""
    from adni_diffusers import cli

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "accelerate launch -m adni_diffusers.train_vqmodel / -m adni_diffusers.train_unet" in help_text


def test_python_m_adni_diffusers_runs_the_command():
    """`python -m adni_diffusers` is the command where the console script is not on PATH (a `pip install --user`
    whose scripts folder is not on it, a venv's python called by path): it said "'adni_diffusers' is a package and
    cannot be directly executed"."""
    import subprocess
    import sys

    from adni_diffusers import __version__

    done = subprocess.run([sys.executable, "-m", "adni_diffusers", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"adni-diffusers {__version__}"


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_one_process_command_under_a_launcher_of_several_is_refused(monkeypatch, capsys, rank):
    """`accelerate launch --num_processes 2 -m adni_diffusers.cli generate ...` ran the whole command twice, both
    copies on the same device (cuda: GPU 0) writing the same --out (each said "8 images in ..."): refused, said
    once, by the main process."""
    from adni_diffusers import cli, generate

    monkeypatch.setattr(generate, "main", lambda args: pytest.fail("ran under a launcher of 2 processes"))
    monkeypatch.setattr("time.sleep", lambda s: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    assert cli.main(["generate", "--model", "m", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err.count("WORLD_SIZE=2: a launcher") == (rank == "0"), err
    monkeypatch.setenv("WORLD_SIZE", "1")  # a job script's leftover WORLD_SIZE=1: one process, it runs
    # an sbatch script's bare `srun adni-diffusers generate ...`: one copy per task of the job
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", rank)
    assert cli.main(["generate", "--model", "m", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err.count("SLURM_STEP_NUM_TASKS=4: srun or mpirun started 4 copies") == (rank == "0"), err
    # an interactive shell may inherit the variable with one copy running: the way out is named
    assert err.count("unset SLURM_STEP_NUM_TASKS") == (rank == "0"), err
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # srun -n 1
    monkeypatch.setattr(generate, "main", lambda args: None)
    assert cli.main(["generate", "--model", "m", "--out", "o"]) == 0


def test_the_demo_under_a_launcher_of_several_is_refused(monkeypatch, capsys):
    """`accelerate launch --num_processes 2 -m adni_diffusers.cli demo` was let through as a multi-process command:
    both processes built the demo data at once, each took the other's recipe for a run cut short ("resuming the
    VQModel training"), the second stage died in gloo's connectFullMesh, and its sampling (a one-process
    `generate` on each process into the same folders) could not have run twice at once either."""
    from adni_diffusers import cli, demo

    monkeypatch.setattr(demo, "main", lambda args: pytest.fail("ran under a launcher of 2 processes"))
    monkeypatch.setattr("time.sleep", lambda s: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["demo", "--quick"]) == 2
    assert "WORLD_SIZE=2: a launcher (accelerate launch, torchrun) started 2 copies" in capsys.readouterr().err
