"""The `adni-diffusers` command line: help, and how a command's failure reaches the user."""

from __future__ import annotations

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
              "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target",  # pip
              "--exclude"}  # tar
    docs = [REPO_ROOT / "README.md", REPO_ROOT / "pipeline_card.md", *(REPO_ROOT / "docs").glob("*.md"),
            *(REPO_ROOT / "adni_diffusers").glob("*.md"), *(REPO_ROOT / "benchmarks").glob("*.md")]
    unknown = set()
    for doc in docs:
        for flag, star in re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)(\*?)", doc.read_text()):
            known = any(o.startswith(flag) for o in options) if star else flag in options or flag in others
            if not known:
                unknown.add(f"{doc.relative_to(REPO_ROOT)}: {flag}{star}")
    assert not unknown, sorted(unknown)
