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
