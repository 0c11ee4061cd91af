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
