"""`adni-diffusers generate`: images on disk, and a warning before a slow precision on the CPU."""

from __future__ import annotations

import logging

import pytest
from PIL import Image


@pytest.mark.parametrize("dtype, warned", [("float32", False), ("bfloat16", True)])
def test_generate_writes_images_and_warns_about_low_precision_on_cpu(tiny_ldm, tmp_path, caplog, dtype, warned):
    from adni_diffusers import cli

    with caplog.at_level(logging.WARNING):
        assert cli.main(["generate", "--model", str(tiny_ldm), "--out", str(tmp_path), "--num-images", "2",
                         "--scheduler", "dpm++", "--steps", "2", "--device", "cpu", "--dtype", dtype]) == 0
    pngs = sorted(p for p in tmp_path.glob("*.png"))
    assert len(pngs) >= 2 and all(Image.open(p).mode in ("L", "RGB") for p in pngs)
    assert ("--dtype bfloat16 on the CPU" in caplog.text) is warned
