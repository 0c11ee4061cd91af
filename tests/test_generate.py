"""`adni-diffusers generate`: images on disk, a warning before a slow precision on the CPU, and grid layout."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import image_mode


@pytest.mark.parametrize("dtype, warned", [("float32", False), ("bfloat16", True)])
def test_generate_writes_images_and_warns_about_low_precision_on_cpu(tiny_ldm, tmp_path, caplog, dtype, warned):
    from adni_diffusers import cli

    with caplog.at_level(logging.WARNING):
        assert cli.main(["generate", "--model", str(tiny_ldm), "--out", str(tmp_path), "--num-images", "2",
                         "--scheduler", "dpm++", "--steps", "2", "--device", "cpu", "--dtype", dtype]) == 0
    pngs = sorted(p for p in tmp_path.glob("*.png"))
    assert len(pngs) >= 2 and all(image_mode(p) in ("L", "RGB") for p in pngs)
    assert ("--dtype bfloat16 on the CPU" in caplog.text) is warned


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "0 is not a positive integer"),
    ("--steps", "-3", "-3 is not a positive integer"),
    ("--steps", "x", "invalid positive_int value: 'x'"),
    ("--batch-size", "0", "0 is not a positive integer"),
    ("--batch-size", "-1", "-1 is not a positive integer"),
    ("--num-images", "0", "0 is not a positive integer"),
    ("--refine-steps", "-1", "-1 is negative"),
    ("--refine-repeats", "-2", "-2 is negative"),
])
def test_generate_refuses_bad_counts_naming_the_flag(tmp_path, capsys, flag, value, message):
    from adni_diffusers import cli

    with pytest.raises(SystemExit) as exit_info:  # argparse: before any model is loaded
        cli.main(["generate", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_generate_checks_counts_before_loading_the_model(tmp_path, capsys):
    """0 is an error, not "use the default" (generate() is also called from Python); refinement needs its steps."""
    from adni_diffusers import cli
    from adni_diffusers.generate import generate

    for name in ("steps", "batch_size", "num_images"):
        with pytest.raises(ValueError, match=f"{name}=0: expected at least 1"):
            generate(str(tmp_path / "no-model"), tmp_path / "out", **{name: 0})
    assert cli.main(["generate", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"),
                     "--refine-repeats", "2"]) == 2
    assert "--refine-repeats 2 needs --refine-steps between 1 and --steps (1000); got 0" in capsys.readouterr().err


@pytest.mark.parametrize("n, columns", [(1, 1), (2, 2), (4, 2), (7, 3), (8, 4), (12, 4), (16, 4), (18, 6)])
def test_grid_columns_fill_every_row_where_they_can(n, columns):
    from adni_diffusers.plots import grid_columns, to_pil_grid

    assert grid_columns(n) == columns
    grid = to_pil_grid(torch.zeros(n, 1, 8, 8), padding=2)
    rows = -(-n // columns)
    expected = (8, 8) if n == 1 else (columns * 10 + 2, rows * 10 + 2)  # make_grid pads cells, not a lone image
    assert grid.size == expected
